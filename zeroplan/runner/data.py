"""Batches for the runner: synthetic ones shaped like InternVL's dynamic-resolution training, and a
reader for InternVL's JSONL conversation format with images on disk.

A sample is text tokens around one image's tiles: each tile becomes `tokens_per_tile` copies of
the image token in input_ids (InternVL's <IMG_CONTEXT>), its pixels a [3, S, S] row of
pixel_values. `seq_len` counts the image tokens, as InternVL's max_seq_length does. Labels are
-100 on image tokens, the prompt and padding, so only the answer is trained.
Real tokenizers cannot be downloaded here, so text goes through a byte-level toy tokenizer.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from zeroplan.core.bounded import read_text_bounded
from zeroplan.core.errors import InvalidInput
from zeroplan.core.profiles import ModelProfile

PAD_ID, BOS_ID, FIRST_BYTE_ID = 0, 1, 3
IGNORE = -100
SYNTHETIC_POOL = 16
SYNTHETIC_TEXT_VOCAB = 256
MAX_DATASET_BYTES = 1 << 30  # the JSONL of conversations; the images themselves are read one by one
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Sample:
    """One conversation: token ids, labels (IGNORE where not trained) and its tiles' pixels."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: object = None  # torch tensor [tiles, 3, S, S] or None

    @property
    def tiles(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])


@dataclass
class Batch:
    """Model inputs of one micro-batch, and what they count (for throughput and FLOPs)."""

    inputs: dict
    samples: int
    tiles: int
    text_tokens: int
    image_tokens: int
    segment_lengths: list[int] = field(default_factory=list)


def draw_tiles(rng: random.Random, most: int, fixed: bool) -> int:
    """Tiles of one sample: exactly `most` when fixed, else uniform on the six counts up to `most`,
    like InternVL's dynamic tiling, which gives an image between a few tiles and max_dynamic_patch
    (plus the thumbnail) by its aspect ratio. `most` is a maximum, as the planner's --tiles is, so a
    run never holds more tiles than its prediction assumes."""
    if fixed or most <= 1:
        return most
    return rng.randint(max(1, most - 6), most)


def synthetic_sample(profile: ModelProfile, image_token_id: int, length: int, tiles: int, rng: random.Random, torch_generator) -> Sample:
    """A `length`-token sample: BOS, a short prompt, the image tokens, more prompt, then the answer.
    Text ids come from a small sub-vocabulary so a tiny model can learn them in a few steps."""
    import torch

    image_tokens = tiles * profile.tokens_per_tile
    text_budget = length - image_tokens - 1
    if text_budget < 2:
        raise InvalidInput(f"{tiles} tiles ({image_tokens} image tokens) leave no text in a {length}-token sample")
    text_vocab = min(SYNTHETIC_TEXT_VOCAB, profile.llm.vocab_size - FIRST_BYTE_ID - 10)
    text = [FIRST_BYTE_ID + rng.randrange(text_vocab) for _ in range(text_budget)]
    before, prompt_len = min(4, text_budget // 4), text_budget // 2
    ids = [BOS_ID] + text[:before] + [image_token_id] * image_tokens + text[before:]
    trained_from = 1 + image_tokens + prompt_len
    labels = [IGNORE] * trained_from + ids[trained_from:]
    pixels = None
    if tiles:
        size = profile.vision.image_size
        pixels = torch.randn(tiles, 3, size, size, generator=torch_generator)
    return Sample(ids, labels, pixels)


class SyntheticData:
    """Endless synthetic micro-batches for one rank, cycling a small pool of samples (so a short
    run can show the loss falling); deterministic per (seed, rank)."""

    def __init__(self, profile, image_token_id, spec, rank: int):
        self.profile, self.image_token_id, self.spec, self.rank = profile, image_token_id, spec, rank
        fit = (spec.seq_len - 4) // profile.tokens_per_tile
        if not spec.packed and spec.tiles > fit:
            raise InvalidInput(f"{spec.tiles} tiles ({spec.tiles * profile.tokens_per_tile} image tokens) do not fit "
                               f"a {spec.seq_len}-token sample with room for text (at most {max(fit, 0)} tiles)")

    def _sequence(self, index: int) -> list[Sample]:
        import torch

        key = (self.spec.seed * 1_000_003 + self.rank) * 1_000_003 + index % SYNTHETIC_POOL
        rng = random.Random(key)
        generator = torch.Generator().manual_seed(key)
        parts = rng.randint(2, 4) if self.spec.packed else 1
        lengths = [self.spec.seq_len // parts] * parts
        lengths[-1] += self.spec.seq_len - sum(lengths)
        # `tiles` bounds a row, packed or not (the memory model's tiles per sequence): a packed
        # row's tiles are shared out among its samples.
        row_tiles = draw_tiles(rng, self.spec.tiles, self.spec.fixed_tiles)
        shares = [row_tiles // parts + (1 if part < row_tiles % parts else 0) for part in range(parts)]
        samples = []
        for length, share in zip(lengths, shares):
            fit = max(0, (length - 4) // self.profile.tokens_per_tile)
            samples.append(synthetic_sample(self.profile, self.image_token_id, length, min(share, fit), rng, generator))
        return samples

    def __iter__(self) -> Iterator[Batch]:
        step = 0
        while True:
            rows = [self._sequence(step * self.spec.micro_batch + row) for row in range(self.spec.micro_batch)]
            yield collate(rows, self.spec.seq_len, self.image_token_id, self.spec.packed)
            step += 1


def byte_tokens(text: str, vocab_size: int) -> list[int]:
    """Toy tokenizer: one id per UTF-8 byte, kept below vocab_size - 10 (the added tokens)."""
    span = min(256, vocab_size - 10 - FIRST_BYTE_ID)
    return [FIRST_BYTE_ID + byte % span for byte in text.encode("utf-8")]


def tile_grid(width: int, height: int, max_tiles: int) -> tuple[int, int]:
    """InternVL-style dynamic tiling: the (columns, rows) grid of at most max_tiles tiles whose
    aspect ratio is closest to the image's; ties go to the larger grid."""
    target = width / height
    candidates = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if c * r <= max_tiles]
    return min(candidates, key=lambda cr: (abs(cr[0] / cr[1] - target), -cr[0] * cr[1]))


def image_tiles(path: Path, image_size: int, max_tiles: int):
    """The image as [tiles, 3, S, S] normalised pixels: a grid of tiles plus a thumbnail when the
    grid has more than one tile (InternVL's dynamic preprocessing, simplified)."""
    import torch
    from PIL import Image

    with Image.open(path) as opened:
        image = opened.convert("RGB")
    columns, rows = tile_grid(image.width, image.height, max(1, max_tiles - 1 if max_tiles > 2 else 1))
    resized = image.resize((columns * image_size, rows * image_size))
    crops = [resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
             for r in range(rows) for c in range(columns)]
    if len(crops) > 1:
        crops.append(image.resize((image_size, image_size)))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = [torch.frombuffer(bytearray(crop.tobytes()), dtype=torch.uint8).view(image_size, image_size, 3)
              for crop in crops]
    return torch.stack([(p.permute(2, 0, 1).float() / 255 - mean) / std for p in pixels])


def image_path(root: Path, name: object) -> Path:
    """The image a record names, relative to the dataset's folder. A path that resolves outside
    that folder (`../../x.png`, an absolute path, a symlink pointing out) is refused: a dataset
    file from elsewhere must not make a training run read, and train on, arbitrary files."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise InvalidInput(f"dataset image must be a non-empty path string, got {str(name)[:80]!r}")
    folder = root.resolve()
    path = (folder / name).resolve()
    if not path.is_relative_to(folder):
        raise InvalidInput(f"dataset image {name[:200]!r} resolves outside the dataset's folder {folder}; "
                           "images must lie under the folder of the JSONL file")
    return path


def conversation_sample(record: dict, root: Path, profile: ModelProfile, image_token_id: int,
                        seq_len: int, max_tiles: int) -> Sample:
    """One JSONL record as a Sample: '<image>' in the human turn becomes the image tokens; human
    turns are not trained, gpt turns are; the tail is cut at seq_len (never the image tokens)."""
    pixels = None
    if record.get("image"):
        pixels = image_tiles(image_path(root, record["image"]), profile.vision.image_size, max_tiles)
        while pixels.shape[0] * profile.tokens_per_tile > seq_len - 8 and pixels.shape[0] > 1:
            pixels = pixels[-1:]
    image_ids = [image_token_id] * (0 if pixels is None else pixels.shape[0] * profile.tokens_per_tile)
    ids, labels = [BOS_ID], [IGNORE]
    for turn in record.get("conversations", []):
        human = turn.get("from") == "human"
        role = "user: " if human else "assistant: "
        value = str(turn.get("value", ""))
        pieces = value.split("<image>", 1) if human and "<image>" in value else [value]
        text_ids = byte_tokens(role + pieces[0], profile.llm.vocab_size)
        if len(pieces) == 2:
            text_ids += image_ids + byte_tokens(pieces[1], profile.llm.vocab_size)
        text_ids += byte_tokens("\n", profile.llm.vocab_size)
        ids += text_ids
        labels += [IGNORE] * len(text_ids) if human else text_ids
    if pixels is not None and image_token_id not in ids:
        ids[1:1] = image_ids
        labels[1:1] = [IGNORE] * len(image_ids)
    return Sample(ids[:seq_len], labels[:seq_len], pixels)


class JsonlData:
    """InternVL's JSONL conversations (images relative to the file's folder), cycled endlessly;
    rank r takes records r, r + world, r + 2·world... as a distributed sampler would."""

    def __init__(self, path: str, profile, image_token_id, spec, rank: int, world_size: int):
        self.path = Path(path)
        self.profile, self.image_token_id, self.spec = profile, image_token_id, spec
        self.rank, self.world_size = rank, world_size
        lines = read_text_bounded(self.path, MAX_DATASET_BYTES, "dataset").splitlines()
        try:
            self.records = [json.loads(line) for line in lines if line.strip()]
        except (ValueError, RecursionError) as error:
            raise InvalidInput(f"cannot read dataset {path}: {error}") from None
        if not self.records:
            raise InvalidInput(f"dataset {path} has no records")
        if not all(isinstance(record, dict) for record in self.records):
            raise InvalidInput(f"dataset {path}: every line must be a JSON object")
        for record in self.records:  # refuse an escaping image before any rank starts training
            if record.get("image"):
                image_path(self.path.parent, record["image"])

    def _sample(self, index: int) -> Sample:
        record = self.records[(index * self.world_size + self.rank) % len(self.records)]
        return conversation_sample(record, self.path.parent, self.profile, self.image_token_id,
                                   self.spec.seq_len, max(1, self.spec.tiles))

    def __iter__(self) -> Iterator[Batch]:
        index = 0
        while True:
            rows = []
            for _ in range(self.spec.micro_batch):
                row, used = [], 0
                while True:
                    sample = self._sample(index)
                    if row and (not self.spec.packed or used + len(sample.input_ids) > self.spec.seq_len):
                        break
                    row.append(sample)
                    used += len(sample.input_ids)
                    index += 1
                    if not self.spec.packed:
                        break
                rows.append(row)
            yield collate(rows, self.spec.seq_len, self.image_token_id, self.spec.packed)


def collate(rows: list[list[Sample]], seq_len: int, image_token_id: int, packed: bool) -> Batch:
    """Rows of samples (several per row when packed) into padded [rows, seq_len] tensors.
    Packed rows get position_ids restarting at each sample and no attention_mask, which is how
    transformers' sdpa/eager masks (and flash-attention's varlen path) find the sample boundaries."""
    import torch

    input_ids = torch.full((len(rows), seq_len), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    position_ids = torch.zeros((len(rows), seq_len), dtype=torch.long)
    pixels, segments = [], []
    for index, row in enumerate(rows):
        start = 0
        for sample in row:
            length = min(len(sample.input_ids), seq_len - start)
            input_ids[index, start:start + length] = torch.tensor(sample.input_ids[:length])
            labels[index, start:start + length] = torch.tensor(sample.labels[:length])
            attention_mask[index, start:start + length] = 1
            position_ids[index, start:start + length] = torch.arange(length)
            segments.append(length)
            start += length
            if sample.pixel_values is not None:
                pixels.append(sample.pixel_values)
        position_ids[index, start:] = torch.arange(seq_len - start)
    image_tokens = int((input_ids == image_token_id).sum())
    tiles = sum(p.shape[0] for p in pixels)
    inputs = {"input_ids": input_ids, "labels": labels}
    if packed:
        inputs["position_ids"] = position_ids
    else:
        inputs["attention_mask"] = attention_mask
    if pixels:
        inputs["pixel_values"] = torch.cat(pixels)
    return Batch(inputs=inputs, samples=sum(len(row) for row in rows), tiles=tiles,
                 text_tokens=int(attention_mask.sum()) - image_tokens, image_tokens=image_tokens,
                 segment_lengths=segments)


def batches(profile, image_token_id: int, spec, rank: int, world_size: int) -> Iterator[Batch]:
    """The run's micro-batches for this rank: the spec's JSONL dataset, else synthetic ones."""
    if spec.dataset:
        return iter(JsonlData(spec.dataset, profile, image_token_id, spec, rank, world_size))
    return iter(SyntheticData(profile, image_token_id, spec, rank))


def merged(batches: list[Batch]) -> Batch:
    """What several micro-batches of one optimizer step count together (for throughput and
    FLOPs); the inputs stay with each micro-batch."""
    if len(batches) == 1:
        return batches[0]
    return Batch(inputs={}, samples=sum(b.samples for b in batches), tiles=sum(b.tiles for b in batches),
                 text_tokens=sum(b.text_tokens for b in batches), image_tokens=sum(b.image_tokens for b in batches),
                 segment_lengths=[length for b in batches for length in b.segment_lengths])

"""The pure estimation core: profiles, the model's tensors, memory, step time, planning and config
rendering over plain data. Imports only itself and the standard library (tests/test_layers.py)."""

"""Printing of the network section shared by recommend and estimate: the stated (or default)
interconnect, the collectives of a step largest first, and, for recommend, the plan that would win
at other node bandwidths. Tables stay within 80 columns."""

from __future__ import annotations


def print_communication(comm: dict, sensitivity: list[dict] | None = None) -> None:
    """The `communication` object of recommend/estimate --json, as text."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]network:[/bold] {comm['assumption']}", soft_wrap=False)
    if not comm["collectives"]:
        console.print("  one GPU: no collectives")
        return
    table = Table(title=f"collectives of one step (comm {comm['comm_s_per_step']:.3f} s, "
                        f"exposed {comm['exposed_comm_s']:.3f} s of {comm['step_s']:.3f} s)")
    for column, justify in (("collective", "left"), ("when", "left"), ("GB/GPU", "right"), ("calls", "right"),
                            ("bus GB/s", "right"), ("s/step", "right")):
        table.add_column(column, justify=justify)
    for item in comm["collectives"]:
        table.add_row(item["name"], item["when"], f"{item['bytes_per_gpu'] / 1e9:,.2f}", str(item["calls"]),
                      f"{item['bus_gbps']:,.1f}", f"{item['seconds_per_step']:.3f}")
    console.print(table)
    if sensitivity:
        what_if = Table(title="best fitting plan by inter-node bandwidth")
        for column in ("node Gb/s", "GB/s/GPU", "stage", "micro×accum", "step s", "exposed comm s"):
            what_if.add_column(column, justify="right")
        for row in sensitivity:
            mark = " ◀ stated" if row["stated"] else ""
            what_if.add_row(f"{row['node_gbit']:g}{mark}", f"{row['inter_node_gbps_per_gpu']:g}", str(row["stage"]),
                            f"{row['micro_batch']}×{row['gradient_accumulation']}", f"{row['step_s']:.3f}",
                            f"{row['exposed_comm_s']:.3f}")
        console.print(what_if)

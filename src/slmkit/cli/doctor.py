"""`slmkit doctor`: what this machine can do, and the one command that fixes each problem."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from slmkit import progress
from slmkit.card import human_bytes
from slmkit.cli.common import handle_errors, out_console


@handle_errors
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="The whole report as JSON.")] = False,
    probe: Annotated[bool, typer.Option("--probe/--no-probe", help="Check llama.cpp in a child process if it was never "
                                        "checked on this CPU (--no-probe: report the kept verdict only).")] = True,
) -> None:
    """CPU features (as listed and as the OS grants them), the llama.cpp build and whether it runs here, slmkit's
    kernels, torch, the store and the evaluation data; for each problem the command that fixes it."""
    from slmkit.doctor import diagnose

    with progress.step("Checking this machine"):
        report = diagnose(probe=probe)
    if as_json:
        typer.echo(report.to_json())
        return
    con = out_console()
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    cpu, llama, native, torch, store = report.cpu, report.llama_cpp, report.native, report.torch, report.store
    state = cpu["os"]
    table.add_row("CPU", f"{cpu['model']} ({cpu['arch']}, {cpu['cores']} cores)")
    table.add_row("  features", " ".join(cpu["features"]) or "-")
    if state.get("xfeatures"):
        saved = [name.upper().replace("AVX512", "AVX-512") for name in ("avx", "avx512", "amx") if state.get(name)]
        grant = "" if not state.get("amx") else f"; AMX tile data granted to this process: {'yes' if state['amx_permitted'] else 'no'}"
        table.add_row("  OS enables", f"{' '.join(saved) or 'no vector'} register state (XSAVE {state['xfeatures']}){grant}")
    if not llama.get("installed"):
        table.add_row("llama.cpp", "not installed")
    else:
        table.add_row("llama.cpp", f"llama-cpp-python {llama['version']}, build {llama['build']}, built by {llama['built_by']}")
        table.add_row("  compiled for", " ".join(llama.get("features") or []) or "-")
        if llama.get("cmake_args"):
            table.add_row("  CMAKE_ARGS", " ".join(llama["cmake_args"]))
        guard = llama["guard"]
        table.add_row("  runs here", guard if isinstance(guard, str) else
                      f"{'[green]yes[/]' if guard['ok'] else '[red]no[/]'}: {guard['detail']}")
    table.add_row("slmkit kernels", (f"[green]in use[/] ({native['int8_isa']} int8; {' '.join(native['flags'])}; {native['where']})"
                                      if native["in_use"] else f"not in use: {native['why_not']}"))
    choices = torch["w8a8_kernel_choices"]
    table.add_row("torch", f"{torch['version']}, {torch['threads']} threads (slmkit uses {torch['slmkit_threads']})")
    table.add_row("  W8A8 kernels", choices if isinstance(choices, str) else
                  ", ".join(f"{shape}: {'/'.join(dict.fromkeys(k))}" for shape, k in choices.items()))
    table.add_row("store", f"{store['path']}: {len(store['models'])} models, {len(store['broken'])} broken, "
                           f"{human_bytes(store['free_bytes'])} free")
    found: dict[str, list[str]] = {}
    for d in report.data:
        found.setdefault(d["found"], []).append(d["name"])
    for origin, names in found.items():
        table.add_row(f"data ({origin})", ", ".join(dict.fromkeys(names)))
    con.print(table)
    if not report.problems:
        con.print("[green]No problems found.[/]")
        return
    con.print(f"\n[bold red]{len(report.problems)} problem(s):[/]")
    for p in report.problems:
        con.print(f"- {p.what}\n  fix: {p.fix}", soft_wrap=True)

"""One-screen summaries printed at the end of long jobs (paths escaped: rich reads ``[`` as markup)."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dvector.cli.console import MAX_LISTED
from dvector.files import display_path
from dvector.shards.build import FEW_UTTERANCES, BuildReport


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def print_build_summary(report: BuildReport, console: Console) -> None:
    table = Table(title=f"build-shards: {escape(str(report.out_dir))}", show_header=False, box=None)
    table.add_row("shards", f"{report.shards_written} written, {report.shards_skipped} already complete, "
                            f"{report.shards_total} in the plan")
    table.add_row("utterances", f"{report.utterances_ok} written this run, {len(report.failures)} skipped in total")
    table.add_row("speakers", str(report.speakers))
    hours = report.audio_s / 3600
    table.add_row("audio", f"{hours:.2f} h in {report.wall_s:.1f} s = {report.realtime_factor:.0f}x realtime")
    if report.stage_s:
        per = ", ".join(f"{k} {v:.1f}" for k, v in report.stage_s.items())
        table.add_row("cpu seconds", per)
    table.add_row("index", "written" if report.index_written else "not yet: other parts are still missing")
    console.print(table)
    if report.scan_problems:
        console.print(f"[yellow]scan: {len(report.scan_problems)} problem(s) while listing the input[/]"
                      + (f" (the first {MAX_LISTED}):" if len(report.scan_problems) > MAX_LISTED else ":"), highlight=False)
    for root, reason in report.scan_problems[:MAX_LISTED]:
        console.print(f"[yellow]scan:[/] {escape(display_path(root))}: {escape(display_path(reason))}", highlight=False)
    if len(report.scan_problems) > MAX_LISTED:
        console.print(f"  ... and {len(report.scan_problems) - MAX_LISTED} more", highlight=False)
    for root in report.empty_roots:
        console.print(f"[yellow]warning:[/] root {escape(display_path(root))} holds no audio with the chosen extensions")
    if report.few_utterance_speakers:
        names = escape(", ".join(display_path(s) for s in report.few_utterance_speakers[:MAX_LISTED]))
        more = len(report.few_utterance_speakers) - MAX_LISTED
        console.print(f"[yellow]note:[/] {len(report.few_utterance_speakers)} speaker(s) have fewer than "
                      f"{FEW_UTTERANCES} utterances: {names}{f' (+{more} more)' if more > 0 else ''}", highlight=False)
    if report.failures:
        kinds = Counter(_reason_kind(f["reason"]) for f in report.failures)
        console.print(f"[yellow]skipped {len(report.failures)} file(s):[/] "
                      + ", ".join(f"{n} {k}" for k, n in kinds.most_common()), highlight=False)
        for f in report.failures[:MAX_LISTED]:
            console.print(escape(f"  {f['root']}/{display_path(f['source'])}: {display_path(f['reason'])}"), highlight=False)
        if len(report.failures) > MAX_LISTED:
            console.print(escape(f"  ... the full list is under \"failures\" in {report.out_dir / 'index.json'}"))


# sampling counters the "data" row reports, or that count no damage (the others are printed when non-zero)
_SAMPLING_REPORTED = {"utterances", "uses", "batches", "rounds", "dropped_short", "repeated_short", "unused",
                      "leftover_uses"}


def _skipped_counts(sampling: dict[str, int]) -> str:
    """The loader's other non-zero counters (bad samples, bad shards, ...) as one phrase, e.g. "2 bad samples"."""
    return ", ".join(f"{count} {name.replace('_', ' ')}" for name, count in sampling.items()
                     if name not in _SAMPLING_REPORTED and isinstance(count, int) and count)


def _best_valid(result) -> str:  # type: ignore[no-untyped-def]
    """``"2.50% (minDCF 0.310, step 400)"``: the best checkpoint's validation measures, what is known of them."""
    if result.best_eer is None:
        return "-"
    dcf, step = getattr(result, "best_min_dcf", None), getattr(result, "best_step", None)
    extra = ", ".join(([f"minDCF {dcf:.3f}"] if dcf is not None else []) + ([f"step {step}"] if step is not None else []))
    return f"{100 * result.best_eer:.2f}%" + (f" ({extra})" if extra else "")


def print_train_summary(result, console: Console) -> None:  # type: ignore[no-untyped-def]
    table = Table(title=f"train: {escape(str(result.model_dir))}", show_header=False, box=None)
    table.add_row("steps", f"{result.steps_done} this run, at step {result.final_step}")
    table.add_row("time", f"{result.seconds:.1f} s, {result.steps_done / max(result.seconds, 1e-9):.2f} steps/s, "
                          f"{100 * result.data_wait:.1f}% waiting for data")
    table.add_row("last loss", f"{result.last_loss:.4f}")
    if result.sampling:
        st = result.sampling
        table.add_row("data (this rank)", f"{st.get('utterances', 0)} utterances read, {st.get('uses', 0)} segments "
                                          f"used; {st.get('repeated_short', 0)} segments tiled from utterances "
                                          f"shorter than L, {st.get('dropped_short', 0)} utterances too short to use")
        skipped = _skipped_counts(st)
        if skipped:
            table.add_row("skipped data (this rank)", skipped)
    valid_skipped = _skipped_counts((getattr(result, "counters", None) or {}).get("validation") or {})
    if valid_skipped:
        table.add_row("skipped validation data", valid_skipped)
    if getattr(result, "skipped_steps", 0):
        table.add_row("skipped steps", f"{result.skipped_steps} with NaN or Inf in the loss or gradient norm "
                                       "(no optimizer step)")
    table.add_row("best valid EER", _best_valid(result))
    if getattr(result, "validation_note", ""):
        table.add_row("validation", escape(result.validation_note))
    if result.checkpoints:
        table.add_row("checkpoints", escape(f"{result.checkpoints[-1]} (and latest.pt, best.pt beside it)"))
    table.add_row("logs", escape(f"tensorboard --logdir {result.model_dir / 'logs'}"))
    console.print(table)

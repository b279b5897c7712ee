"""Commands on shard folders: build-shards, index, check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer
from rich.markup import escape

from dvector.cli.console import console, progress, warn
from dvector.cli.options import EXTENSIONS, Dask, Extensions, Workers, default, given_options, out_option, seed_option
from dvector.config import BuildConfig, FeatureConfig, VadConfig, parse_speed_perturb
from dvector.errors import DvectorError

ShardsOut = out_option("Output folder for shard-NNNNNN.tar and index.json.", "-s", "--save_dir", "--save-dir")
ShuffleSeed = seed_option("Seed of the block shuffle.")
Roots = Annotated[Optional[List[Path]], typer.Argument(
    help="Root directories; each holds one folder per speaker (subfolders allowed). Or, instead or as well: "
    "--kaldi, --manifest, --lhotse.", show_default=False)]
Kaldi = Annotated[Optional[List[Path]], typer.Option(
    "--kaldi", metavar="DATA_DIR", help="A Kaldi data directory (wav.scp, utt2spk, optional segments); repeatable. "
    "Speakers are DATA_DIR_NAME/SPEAKER.")]
KaldiRoot = Annotated[Optional[Path], typer.Option(
    "--kaldi-root", help="Folder that relative wav.scp paths start from (default: the current folder).")]
AllowCommands = Annotated[bool, typer.Option(
    "--allow-commands", help="Run wav.scp entries that are commands ('... |'), each with a timeout; without it "
    "they are refused and counted.")]
Manifest = Annotated[Optional[List[Path]], typer.Option(
    "--manifest", metavar="FILE", help="A table of utterances (.csv, .tsv or .jsonl) with path and speaker columns, "
    "optional start and end (seconds) and id; paths relative to the file's folder; repeatable.")]
Lhotse = Annotated[Optional[List[Path]], typer.Option(
    "--lhotse", metavar="MANIFEST", help="A Lhotse cut set, or a recording set and its supervision set (give "
    "both); speakers from the supervisions. Needs pip install 'dvector\\[lhotse]'.")]
ShardSize = Annotated[int, typer.Option(
    "--shard-size", help="At most about this many utterances per shard (exceeded by less than one speaker block).")]
MinShards = Annotated[int, typer.Option(
    "--min-shards", help="Split even a small corpus into at least this many shards.")]
BlockSize = Annotated[int, typer.Option("--block-size", help="Utterances per speaker block inside shards.")]
SampleRate = Annotated[int, typer.Option("--sample-rate", help="Resample every file to this rate (Hz).")]
NMels = Annotated[int, typer.Option("--n-mels", help="Mel bands.")]
Vad = Annotated[bool, typer.Option("--vad/--no-vad", help="Trim silence and shorten long pauses.")]
FeaturesOf = Annotated[Optional[Path], typer.Option(
    "--features", metavar="RUN", help="Use a trained run's feature and VAD settings (its run folder or a checkpoint "
    "file) instead of the defaults and --sample-rate, --n-mels, --vad: shards that `train --init RUN` (or -c RUN) "
    "accepts. Feature flags given as well must agree with the run's.")]
MergeSpeakers = Annotated[bool, typer.Option(
    "--merge-speakers", help="Key speakers by folder name alone, merging same-named folders across roots.")]
SpeedPerturb = Annotated[str, typer.Option(
    "--speed-perturb", help="Also write each utterance at these speeds (e.g. 0.9,1.1) as new speakers ROOT/SPK@sp0.9.")]
SplitSeconds = Annotated[float, typer.Option(
    "--split-seconds", help="Cut each utterance's speech (after VAD) into samples of this many seconds, same "
    "speaker; a remainder under half a segment joins the last one (0: off). For few, long utterances per speaker.")]
Part = Annotated[Optional[str], typer.Option(
    "--part", help="Build only part i of n (e.g. 3/8), for array jobs on shared storage.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a build made with another configuration.")]
Strict = Annotated[bool, typer.Option("--strict", help="Exit with status 2 if any file was skipped (or, with "
    "--kaldi/--manifest/--lhotse, any line of them could not be used).")]
FailFast = Annotated[bool, typer.Option("--fail-fast", help="Stop at the first file that cannot be used.")]
ShardFolder = Annotated[Path, typer.Argument(help="A shard folder with index.json.")]
PartsFolder = Annotated[Path, typer.Argument(help="A shard folder made by build-shards (all parts).")]


def build_shards_cmd(
    ctx: typer.Context,
    roots: Roots = None,
    out: ShardsOut = Path("shards"),
    kaldi: Kaldi = None,
    kaldi_root: KaldiRoot = None,
    allow_commands: AllowCommands = False,
    manifest: Manifest = None,
    lhotse: Lhotse = None,
    extensions: Extensions = EXTENSIONS,
    workers: Workers = 0,
    dask: Dask = None,
    shard_size: ShardSize = default(BuildConfig, "shard_size"),
    min_shards: MinShards = default(BuildConfig, "min_shards"),
    block_size: BlockSize = default(BuildConfig, "block_size"),
    seed: ShuffleSeed = default(BuildConfig, "seed"),
    sample_rate: SampleRate = default(FeatureConfig, "sample_rate"),
    n_mels: NMels = default(FeatureConfig, "n_mels"),
    vad: Vad = default(VadConfig, "enabled"),
    features: FeaturesOf = None,
    merge_speakers: MergeSpeakers = default(BuildConfig, "merge_speakers"),
    speed_perturb: SpeedPerturb = "",
    split_seconds: SplitSeconds = default(BuildConfig, "split_seconds"),
    part: Part = None,
    overwrite: Overwrite = False,
    strict: Strict = False,
    fail_fast: FailFast = False,
) -> None:
    """Decode, resample, trim silence and compute log-mels of every utterance; write WebDataset shards.

    Reads root folders of speaker folders, Kaldi data directories (--kaldi), tables (--manifest) and Lhotse
    manifests (--lhotse), alone or together.

    Resumable: run the same command again to finish an interrupted build. With --dask, one task per
    shard on the cluster (the output folder must be shared storage); the same shards as a local build.
    """
    from dvector.cli.summary import print_build_summary
    from dvector.corpus import CorpusInputs
    from dvector.shards.build import Progress as BuildProgress, build_shards, parse_part

    feature_cfg, vad_cfg = FeatureConfig(sample_rate=sample_rate, n_mels=n_mels), VadConfig(enabled=vad)
    if features is not None:
        given = {name: value for name, value in (("sample_rate", sample_rate), ("n_mels", n_mels), ("vad", vad))
                 if name in given_options(ctx)}
        feature_cfg, vad_cfg = features_of_run(features, given)
    cfg = BuildConfig(extensions=extensions, shard_size=shard_size, min_shards=min_shards, block_size=block_size,
                      seed=seed, merge_speakers=merge_speakers, speed_perturb=parse_speed_perturb(speed_perturb),
                      split_seconds=split_seconds, features=feature_cfg, vad=vad_cfg)
    with progress() as bar:
        task = bar.add_task("build-shards", total=None, info="scanning")
        audio = [0.0]

        def start(files: int, shards: int) -> None:
            bar.update(task, total=files, info=f"{shards} shards to write")

        def advance(files: int, audio_s: float) -> None:
            audio[0] += audio_s
            elapsed = bar.tasks[0].elapsed or 1e-9
            bar.update(task, advance=files, info=f"{audio[0] / 3600:.2f} h audio, {audio[0] / elapsed:.0f}x realtime")

        inputs = CorpusInputs(roots=tuple(str(r) for r in roots or ()), kaldi=tuple(str(k) for k in kaldi or ()),
                              kaldi_root=str(kaldi_root) if kaldi_root else None,
                              manifests=tuple(str(m) for m in manifest or ()), lhotse=tuple(str(m) for m in lhotse or ()),
                              allow_commands=allow_commands)
        report = build_shards(inputs, out, cfg, workers=workers, part=parse_part(part),
                              overwrite=overwrite, fail_fast=fail_fast, progress=BuildProgress(start, advance),
                              dask=dask)
    print_build_summary(report, console)
    _after_summary(report, cfg, strict, listing=bool(kaldi or manifest or lhotse))


def _after_summary(report: Any, cfg: BuildConfig, strict: bool, listing: bool) -> None:
    """What was split, and ``--strict``'s exit status 2 when a file (or, from a listing, a line) was skipped."""
    from dvector.shards.shard_job import fitting_segment

    if cfg.split_seconds:
        console.print(f"split: {report.utterances_ok} utterance(s) written this run as {report.samples_ok} "
                      f"sample(s) of about {cfg.split_seconds:g} s")
    if report.cut_to_fit:
        minutes = fitting_segment(cfg.features.n_mels) * cfg.features.hop_ms / 60000
        console.print(f"split: {report.cut_to_fit} utterance(s) with more speech than one sample may hold (the most "
                      f"a reader takes) written as samples of about {minutes:.0f} min")
    listing_problems = report.scan_problems if listing else []
    if strict and (report.failures or listing_problems):
        console.print(f"[bold red]--strict:[/] {len(report.failures)} file(s) were skipped"
                      + (f", {len(listing_problems)} problem(s) found listing the input" if listing_problems else ""))
        raise typer.Exit(2)


def features_of_run(run: Path, given: dict[str, Any]) -> tuple[FeatureConfig, VadConfig]:
    """``--features RUN``: the feature and VAD settings that the run's checkpoint records; ``given``: the
    feature flags typed as well (sample_rate, n_mels, vad), each of which must agree with the run's."""
    from dvector.training.checkpoint import load_checkpoint

    state = load_checkpoint(run)
    if not state.get("feature_config"):
        raise DvectorError(f"--features {run}: its checkpoint records no feature settings (it trained on shards "
                           "without index.json); give --sample-rate and --n-mels instead")
    feature_cfg = FeatureConfig.from_dict(state["feature_config"])
    vad_cfg = VadConfig.from_dict(state["vad_config"]) if state.get("vad_config") else VadConfig()
    theirs = {"sample_rate": feature_cfg.sample_rate, "n_mels": feature_cfg.n_mels, "vad": vad_cfg.enabled}
    typed = {"sample_rate": lambda v: f"--sample-rate {v}", "n_mels": lambda v: f"--n-mels {v}",
             "vad": lambda v: "--vad" if v else "--no-vad"}
    for name, value in given.items():
        if value != theirs[name]:
            raise DvectorError(f"{typed[name](value)} conflicts with --features {run}, whose features have "
                               f"{typed[name](theirs[name])}: leave the feature flags out, or --features")
    return feature_cfg, vad_cfg


def index_cmd(folder: PartsFolder) -> None:
    """Rebuild index.json from the shards and build records on disk (e.g. after --part builds)."""
    from dvector.shards.build import write_failure
    from dvector.shards.index import write_index

    try:
        index = write_index(folder)
    except OSError as exc:
        raise write_failure(folder, exc) from exc
    t = index["totals"]
    console.print(escape(f"wrote {folder / 'index.json'}: {t['shards']} shards, {t['utterances']} utterances, "
                         f"{t['speakers']} speakers, {t['failures']} skipped files"))


def check_cmd(
    folder: ShardFolder,
    workers: Workers = 0,
) -> None:
    """Verify every shard against the index: present, same size and sha256, every sample decodable."""
    from dvector.shards.check import check_shards
    from dvector.shards.index import read_index

    total = len(read_index(folder)["shards"])
    with progress() as bar:
        task = bar.add_task("check", total=total, info="")
        report = check_shards(folder, workers, on_shard=lambda: bar.advance(task))
    for name in report.unlisted:  # a warning: what the index lists is intact (see dvector.shards.check)
        warn(f"{folder / name}: a shard file that index.json does not list (from another build, or built "
             f"after the index: `dvector index {folder}`); readers of the folder ignore it")
    if report.ok:
        extra = f"; {len(report.unlisted)} file(s) not in the index (see the warnings)" if report.unlisted else ""
        console.print(f"[green]ok[/]: {report.shards} shards match the index{escape(extra)}")
        return
    for name, problem in report.problems:
        console.print(f"[red]{escape(name)}[/]: {escape(problem)}", highlight=False)
    console.print(f"[bold red]{len({n for n, _ in report.problems})} of {report.shards} shards are damaged[/]")
    raise typer.Exit(1)

"""Bad input, for every command: exit code 2, exactly one line on stderr starting with
"Error:" that says what is wrong and how to fix it, no traceback, and nothing written (no run
directory, no output file, an existing run directory byte for byte unchanged).

Each case names a `fragment` of its message that docs/errors.md must contain (checked below),
and optionally a `detail` that is particular to the case (the row, the suggested name, ...).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

ERRORS_MD = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# Options that keep a `train` fast; a case's own options come after them and win.
TRAIN = ["train", "--hidden", "8", "--max-epochs", "1", "--no-evaluate", "-q", "--out", "{tmp}/out"]


@dataclass
class Case:
    id: str
    argv: list[str]
    fragment: str  # in the message, and in docs/errors.md
    detail: str | None = None  # in the message: what is particular to this case
    prepare: Callable[[Path], None] | None = None
    skip: str | None = None  # a reason to skip here


# -- inputs, written into each case's own directory ----------------------------------------
def write_inputs(tmp: Path) -> None:
    x = np.random.default_rng(0).normal(size=(40, 4))
    np.savez(tmp / "nox.npz", data=x)
    np.savez(tmp / "xpos.npz", x=x, x_pos=x[:, :3])
    bad = x.copy()
    bad[17, 1] = np.nan
    np.save(tmp / "nan.npy", bad)
    bad = x.copy()
    bad[5, 0] = np.inf
    np.save(tmp / "inf.npy", bad)
    np.save(tmp / "empty.npy", np.zeros((0, 4)))
    np.save(tmp / "plain.npy", x)
    np.save(tmp / "cube.npy", x.reshape(40, 2, 2))
    np.save(tmp / "line.npy", x[:, 0])
    np.save(tmp / "prior3.npy", np.zeros((50, 3)))
    np.save(tmp / "wide.npy", np.zeros((30, 7)))
    nan20 = np.zeros((10, 20))
    nan20[3, 0] = np.nan
    np.save(tmp / "nan20.npy", nan20)
    (tmp / "bad.csv").write_text("a,b\n1,2\n3,x\n")
    (tmp / "garbage.npy").write_bytes(b"\x80\x04not a numpy file")
    (tmp / "unknown.toml").write_text("[train]\nlearning_rate = 0.1\n")
    (tmp / "badsection.toml").write_text("[optim]\nlr = 0.1\n")
    (tmp / "broken.toml").write_text("[train\nlr = \n")
    (tmp / "words.toml").write_text('[train]\nlr = "fast"\n')
    (tmp / "afile").write_text("a file, not a directory")
    (tmp / "exists.npz").write_bytes(b"someone's data")
    (tmp / "notarun").mkdir()
    (tmp / "notarun" / "notes.txt").write_text("not a run")


class Evil:
    """Unpickling this would create the file `ran` beside the pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def truncate(rel: str) -> Callable[[Path], None]:
    def prepare(tmp: Path) -> None:
        path = tmp / rel
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return prepare


def damage_tensor_bytes(rel: str) -> Callable[[Path], None]:
    """Garbage in the tensor data (the header stays valid): only the checksum can tell."""
    def prepare(tmp: Path) -> None:
        path = tmp / rel
        data = bytearray(path.read_bytes())
        data[-64:] = bytes(range(64))
        path.write_bytes(bytes(data))
    return prepare


def other_architecture(*which: str) -> Callable[[Path], None]:
    """Checkpoints of a run with another architecture (two hidden layers instead of one)."""
    def prepare(tmp: Path) -> None:
        for w in which:
            shutil.copy(tmp / "other" / "checkpoints" / f"{w}.safetensors", tmp / "run" / "checkpoints" / f"{w}.safetensors")
    return prepare


def pickle_as(rel: str) -> Callable[[Path], None]:
    def prepare(tmp: Path) -> None:
        (tmp / rel).write_bytes(pickle.dumps(Evil(tmp / "ran")))
    return prepare


def write(rel: str, content: str) -> Callable[[Path], None]:
    def prepare(tmp: Path) -> None:
        (tmp / rel).write_text(content)
    return prepare


def unreadable(rel: str) -> Callable[[Path], None]:
    def prepare(tmp: Path) -> None:
        (tmp / rel).chmod(0)
    return prepare


def read_only(rel: str) -> Callable[[Path], None]:
    def prepare(tmp: Path) -> None:
        (tmp / rel).mkdir()
        (tmp / rel).chmod(0o555)
    return prepare


ROOT_SKIP = "root can read and write everything" if IS_ROOT else None

CASES = [
    # -- any command: usage errors, as click words them --------------------------------
    Case("unknown-option", ["terms", "--bogus"], "No such option"),
    Case("close-option", ["plugins", "--al"], "No such option", "Possible options: --all"),
    Case("extra-argument", ["priors", "gmm", "extra"], "Got unexpected extra argument"),
    Case("unknown-prior-detail", ["priors", "extra"], "Unknown prior '"),
    Case("close-json-option", ["estimators", "--jsn"], "No such option", "Possible options: --json"),
    Case("data-list-extra-argument", ["data", "list", "gaussian", "extra"], "Got unexpected extra argument"),
    Case("unknown-command", ["nosuchcommand"], "No such command"),
    Case("not-a-number", [*TRAIN, "--lr", "fast"], "Invalid value for", "'--lr'"),
    Case("missing-option", ["data", "generate", "gaussian"], "Missing option", "'--out'"),
    # -- train: names and --terms ------------------------------------------------------
    Case("unknown-term", [*TRAIN, "--terms", "recn,kl"], "Unknown term", "Did you mean 'recon'?"),
    Case("unknown-prior", [*TRAIN, "--prior", "gm"], "Unknown prior", "Did you mean 'gmm'?"),
    Case("unknown-estimator", [*TRAIN, "-o", "kl.estimator=analytc"], "Unknown kl estimator", "Did you mean 'analytic'?"),
    Case("unknown-critic", [*TRAIN, "--terms", "ed", "-o", "infonce.critic=cosin"], "Unknown InfoNCE critic", "Did you mean 'cosine'?"),
    Case("unknown-dataset", [*TRAIN, "--data", "nosuchdataset"], "Unknown dataset"),
    Case("terms-empty-item", [*TRAIN, "--terms", "recon,,kl"], "Cannot read term", "e.g. recon,kl:0.5"),
    Case("terms-two-colons", [*TRAIN, "--terms", "recon:1:2"], "Cannot read term"),
    Case("terms-bad-weight", [*TRAIN, "--terms", "recon,kl:abc"], "must be a number", "'kl'"),
    Case("terms-twice", [*TRAIN, "--terms", "recon,recon"], "appears twice in --terms"),
    Case("option-for-absent-term", [*TRAIN, "-o", "infonce.critic=cosine"], "which is not among the terms"),
    Case("unknown-term-option", [*TRAIN, "-o", "recon.nosuch=1"], "Unknown option",
         "Valid options: likelihood (str, default 'mse'), data_dim"),
    Case("unknown-prior-option", [*TRAIN, "--prior-option", "bogus=1"], "Unknown option", "for prior 'standard-normal'"),
    Case("unknown-data-option", [*TRAIN, "--data-option", "foo=1"], "Unknown option",
         "for dataset 'mixture'. Valid options: n (int, default 10000)"),
    Case("prior-option-type", [*TRAIN, "--prior", "gmm", "--prior-option", "n_components=abc"], "must be",
         "Option 'n_components' of prior 'gmm' must be int | None, got 'abc'. Valid options: n_components"),
    Case("estimator-option-type", [*TRAIN, "--terms", "ed", "-o", "entropy.chunk=abc"], "must be",
         "Option 'chunk' of term 'entropy' with estimator 'mws' must be int | None, got 'abc'"),
    # -- train: zero, negative and out-of-range numbers --------------------------------
    Case("batch-size-0", [*TRAIN, "--batch-size", "0"], "must be a positive integer", "train.batch_size (--batch-size)"),
    Case("lr-0", [*TRAIN, "--lr", "0"], "must be a positive number", "train.lr (--lr)"),
    Case("lr-negative", [*TRAIN, "--lr", "-0.001"], "must be a positive number", "train.lr (--lr)"),
    Case("lr-nan", [*TRAIN, "--lr", "nan"], "must be a positive number", "got nan"),
    Case("epochs-0", [*TRAIN, "--max-epochs", "0"], "must be a positive integer", "train.max_epochs"),
    Case("latent-dim-negative", [*TRAIN, "--latent-dim", "-2"], "must be a positive integer", "model.latent_dim"),
    Case("hidden-0", [*TRAIN, "--hidden", "16,0"], "layer sizes must be positive integers", "got 0 at position 2"),
    Case("hidden-words", [*TRAIN, "--hidden", "a,b"], "--hidden must be comma-separated layer sizes"),
    Case("n-0", [*TRAIN, "--n", "0"], "must be a positive integer", "data.n (--n)"),
    Case("n-too-few", [*TRAIN, "--n", "2"], "too few for a train/val/test split"),
    Case("grad-clip-negative", [*TRAIN, "--grad-clip", "-1"], "must be a non-negative number", "train.grad_clip"),
    Case("data-seed-negative", [*TRAIN, "--data-seed", "-1"], "must be a non-negative integer", "data.seed"),
    Case("chunk-0", [*TRAIN, "--terms", "ed", "-o", "entropy.chunk=0"], "chunk must be a positive integer"),
    Case("temperature-0", [*TRAIN, "--terms", "ed", "-o", "infonce.temperature=0"], "temperature must be > 0"),
    Case("select-unknown", [*TRAIN, "--select", "best"], "must be one of", "train.select"),
    Case("device-unknown", [*TRAIN, "--device", "tpu"], "must be cpu, cuda, cuda:N or auto"),
    # -- train: files ------------------------------------------------------------------
    Case("data-missing", [*TRAIN, "--data", "{tmp}/missing.npz"], "Data file not found"),
    Case("data-unreadable", [*TRAIN, "--data", "{tmp}/plain.npy"], "permission denied", prepare=unreadable("plain.npy"), skip=ROOT_SKIP),
    Case("data-garbage", [*TRAIN, "--data", "{tmp}/garbage.npy"], "which elbokit never unpickles"),
    Case("data-no-x", [*TRAIN, "--data", "{tmp}/nox.npz"], "no array named 'x'"),
    Case("data-x-pos-shape", [*TRAIN, "--data", "{tmp}/xpos.npz"], "x_pos has shape", "(40, 3)"),
    Case("data-1d", [*TRAIN, "--data", "{tmp}/line.npy"], "must be an (n, ...) array of examples", "(40,)"),
    Case("data-3d-conv", [*TRAIN, "--data", "{tmp}/cube.npy", "--model", "conv"], "model 'conv' takes 3-D examples", "(2, 2)"),
    Case("data-nan", [*TRAIN, "--data", "{tmp}/nan.npy"], "has NaN or Inf in row", "row 17"),
    Case("data-inf", [*TRAIN, "--data", "{tmp}/inf.npy"], "has NaN or Inf in row", "row 5"),
    Case("data-empty", [*TRAIN, "--data", "{tmp}/empty.npy"], "is empty"),
    Case("data-csv-word", [*TRAIN, "--data", "{tmp}/bad.csv"], "has a value that is not a number", "row 1"),
    Case("infonce-without-positives", [*TRAIN, "--data", "{tmp}/plain.npy", "--terms", "ed"], "needs positive pairs"),
    Case("bernoulli-outside-unit-interval", [*TRAIN, "--data", "{tmp}/plain.npy", "-o", "recon.likelihood=bernoulli"],
         "The bernoulli likelihood needs data in [0, 1]", "row "),
    Case("prior-dimension", [*TRAIN, "--prior", "gmm", "--prior-samples", "{tmp}/prior3.npy"],
         "but the latent dimension is", "dimension 3"),
    Case("prior-no-samples", [*TRAIN, "--prior", "gmm", "--data", "{tmp}/plain.npy"], "give --prior-samples"),
    Case("sample-only-prior-with-kl", [*TRAIN, "--prior", "samples", "--terms", "classic"],
         "needs the prior's log_prob", "use the 'ed' terms with xent.estimator=knn"),
    Case("config-malformed", [*TRAIN, "--config", "{tmp}/broken.toml"], "is not valid TOML"),
    Case("config-unknown-key", [*TRAIN, "--config", "{tmp}/unknown.toml"], "Unknown config key", "'train.learning_rate'"),
    Case("config-unknown-section", [*TRAIN, "--config", "{tmp}/badsection.toml"], "Unknown config section", "[optim]"),
    Case("config-missing", [*TRAIN, "--config", "{tmp}/nosuch.toml"], "Config file not found"),
    Case("config-wrong-type", [*TRAIN, "--config", "{tmp}/words.toml"], "must be a positive number", "got 'fast'"),
    Case("out-under-a-file", [*TRAIN, "--out", "{tmp}/afile/run"], "is a file, not a directory"),
    Case("out-read-only", [*TRAIN, "--out", "{tmp}/ro/run"], "is not writable", prepare=read_only("ro"), skip=ROOT_SKIP),
    Case("out-exists", [*TRAIN, "--out", "{tmp}/run"], "already exists", "--resume"),
    # -- train --resume ----------------------------------------------------------------
    Case("resume-missing", ["train", "--resume", "{tmp}/nosuchrun"], "Run directory not found"),
    Case("resume-not-a-run", ["train", "--resume", "{tmp}/notarun"], "is not an elbokit run directory"),
    Case("resume-truncated", ["train", "--resume", "{tmp}/run", "--max-epochs", "3"], "is not a readable elbokit checkpoint",
         prepare=truncate("run/checkpoints/last.safetensors")),
    Case("resume-damaged", ["train", "--resume", "{tmp}/run", "--max-epochs", "3"], "do not match the CRC-32",
         prepare=damage_tensor_bytes("run/checkpoints/last.safetensors")),
    Case("resume-other-architecture", ["train", "--resume", "{tmp}/run", "--max-epochs", "3"],
         "does not match this run's config.toml", prepare=other_architecture("last")),
    Case("resume-pickle", ["train", "--resume", "{tmp}/run", "--max-epochs", "3"], "is not a readable elbokit checkpoint",
         prepare=pickle_as("run/checkpoints/last.safetensors")),
    Case("resume-without-checkpoint", ["train", "--resume", "{tmp}/run"], "has no checkpoint to resume from",
         prepare=lambda tmp: (tmp / "run" / "checkpoints" / "last.safetensors").unlink()),
    Case("resume-changed-key", ["train", "--resume", "{tmp}/run", "--latent-dim", "3"], "cannot change when resuming"),
    Case("resume-with-config", ["train", "--resume", "{tmp}/run", "--config", "{tmp}/unknown.toml"],
         "--config cannot be combined with --resume"),
    Case("resume-damaged-metrics", ["train", "--resume", "{tmp}/run", "--max-epochs", "3"],
         "is not an epoch's metrics record", prepare=write("run/metrics.jsonl", "{not json\n")),
    # -- evaluate ----------------------------------------------------------------------
    Case("evaluate-missing", ["evaluate", "{tmp}/nosuchrun"], "Run directory not found"),
    Case("evaluate-not-a-run", ["evaluate", "{tmp}/notarun"], "is not an elbokit run directory"),
    Case("evaluate-iw-samples-0", ["evaluate", "{tmp}/run", "--iw-samples", "0"], "--iw-samples must be a positive integer"),
    Case("evaluate-device-unknown", ["evaluate", "{tmp}/run", "--device", "gpu"], "--device must be cpu, cuda, cuda:N or auto"),
    Case("evaluate-truncated", ["evaluate", "{tmp}/run"], "is not a readable elbokit checkpoint",
         prepare=truncate("run/checkpoints/best.safetensors")),
    Case("evaluate-damaged", ["evaluate", "{tmp}/run"], "do not match the CRC-32",
         prepare=damage_tensor_bytes("run/checkpoints/best.safetensors")),
    Case("evaluate-other-architecture", ["evaluate", "{tmp}/run"], "does not match this run's config.toml",
         prepare=other_architecture("best")),
    Case("evaluate-pickle", ["evaluate", "{tmp}/run", "--checkpoint", "{tmp}/evil.safetensors"],
         "is not a readable elbokit checkpoint", prepare=pickle_as("evil.safetensors")),
    Case("evaluate-unknown-checkpoint", ["evaluate", "{tmp}/run", "--checkpoint", "bset"], "Unknown checkpoint"),
    Case("evaluate-unknown-split", ["evaluate", "{tmp}/run", "--split", "tset"], "Unknown split"),
    Case("evaluate-wrong-width", ["evaluate", "{tmp}/run", "--data", "{tmp}/wide.npy"], "but the model takes", "(30, 7)"),
    Case("evaluate-nan-data", ["evaluate", "{tmp}/run", "--data", "{tmp}/nan20.npy"], "has NaN or Inf in row", "row 3"),
    Case("evaluate-corrupt-data-record", ["evaluate", "{tmp}/run"], "is corrupt", prepare=write("run/data.safetensors", "junk")),
    # -- plot --------------------------------------------------------------------------
    Case("plot-missing", ["plot", "{tmp}/nosuchrun"], "Run directory not found"),
    Case("plot-truncated", ["plot", "{tmp}/run"], "is not a readable elbokit checkpoint",
         prepare=truncate("run/checkpoints/best.safetensors")),
    Case("plot-other-architecture", ["plot", "{tmp}/run"], "does not match this run's config.toml",
         prepare=other_architecture("best")),
    Case("plot-pickle", ["plot", "{tmp}/run"], "is not a readable elbokit checkpoint",
         prepare=pickle_as("run/checkpoints/best.safetensors")),
    Case("plot-no-metrics", ["plot", "{tmp}/run"], "has no metrics yet", prepare=write("run/metrics.jsonl", "")),
    Case("plot-unknown-split", ["plot", "{tmp}/run", "--split", "nope"], "Unknown split"),
    Case("plot-dir-is-a-file", ["plot", "{tmp}/run"], "is a file, not a directory", prepare=write("run/plots", "in the way")),
    # -- data generate -----------------------------------------------------------------
    Case("generate-unknown", ["data", "generate", "gaussain", "--out", "{tmp}/g.npz"], "Unknown generator", "Did you mean 'gaussian'?"),
    Case("generate-n-0", ["data", "generate", "gaussian", "--n", "0", "--out", "{tmp}/g.npz"], "must be a positive integer", "n "),
    Case("generate-noise-negative", ["data", "generate", "mixture", "--noise-std", "-1", "--out", "{tmp}/g.npz"],
         "must be a non-negative number", "noise_std"),
    Case("generate-seed-negative", ["data", "generate", "mixture", "--seed", "-1", "--out", "{tmp}/g.npz"],
         "must be a non-negative integer", "seed"),
    Case("generate-not-npz", ["data", "generate", "gaussian", "--out", "{tmp}/g.txt"], "--out must end in .npz"),
    Case("generate-under-a-file", ["data", "generate", "gaussian", "--out", "{tmp}/afile/g.npz"], "is a file, not a directory"),
    Case("generate-exists", ["data", "generate", "gaussian", "--out", "{tmp}/exists.npz"], "already exists", "--force"),
    Case("generate-unknown-subcommand", ["data", "nosuch"], "No such command"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny trained run and one with another architecture, copied into each case."""
    from elbokit.cli import main

    root = tmp_path_factory.mktemp("runs")
    common = ["train", "--n", "200", "--batch-size", "50", "--max-epochs", "1", "--no-evaluate", "-q"]
    assert main([*common, "--hidden", "8", "--out", str(root / "run")]) == 0
    assert main([*common, "--hidden", "8,8", "--out", str(root / "other")]) == 0
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with its content hash: what 'nothing written' compares."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            out[rel] = "dir"
        elif os.access(path, os.R_OK):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "unreadable"
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, run_cli, runs, case):
    if case.skip:
        pytest.skip(case.skip)
    write_inputs(tmp_path)
    shutil.copytree(runs / "run", tmp_path / "run")
    shutil.copytree(runs / "other", tmp_path / "other")
    if case.prepare:
        case.prepare(tmp_path)
    before = snapshot(tmp_path)
    try:
        res = run_cli(*(a.replace("{tmp}", str(tmp_path)) for a in case.argv))
        after = snapshot(tmp_path)
    finally:
        for path in tmp_path.rglob("*"):  # let pytest clean up after the chmod cases
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert res.exit_code == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout and res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and len(lines[0]) > len("Error: ") + 10, res.stderr
    assert case.fragment in lines[0]
    if case.detail:
        assert case.detail in lines[0]
    assert after == before  # no run directory, no output file, no temporary file; inputs untouched
    assert not (tmp_path / "ran").exists()  # no pickle was ever loaded


def test_there_are_at_least_thirty_distinct_cases_across_every_command():
    def what(case):  # the command line and what was done to the files before it
        closure = tuple(cell.cell_contents for cell in (case.prepare.__closure__ or ())) if case.prepare else ()
        return tuple(case.argv), getattr(case.prepare, "__qualname__", None), closure

    assert len({c.id for c in CASES}) == len({what(c) for c in CASES}) == len(CASES) >= 30
    commands = {c.argv[0] if c.argv[0] != "data" else " ".join(c.argv[:2]) for c in CASES}
    assert {"train", "evaluate", "plot", "data generate", "terms", "priors", "plugins"} <= commands


def test_every_message_is_documented_in_errors_md():
    text = ERRORS_MD.read_text()
    missing = [c.fragment for c in CASES if c.fragment not in text]
    assert not missing, f"docs/errors.md lacks: {missing}"

"""Config errors through the real ``torchrun -m megallama.train``, one launch per class of error.

Each row checks what the user sees: the job ends within seconds (no rank waits in a collective),
the ranks exit with status 2 (torchrun's failure report; a rank the launcher stopped after the
first failure shows -15), the ranks' output ends with the one line ``megallama.train: error: ...``
naming the option, without a traceback, the line appears once per reporting rank (normally once:
rank 0 reports at once, the others only if not stopped within a few seconds), the run directory
is not created and the token files are unchanged. torchrun then reports the failed workers with a
traceback of its own (``ChildFailedError``): that is the launcher's output, after the ranks', and
outside megallama. ``test_a_rank_alone_...`` shows that each rank fails on its own. A launch costs
seconds, so the options are covered in tests/test_train_config.py, here one row per class.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megallama.data.indexed import IndexedWriter
from megallama.data.tokenizer_trainer import train_tokenizer
from tests.distributed.cli import REPO, overrides, torchrun

pytestmark = pytest.mark.slow

PROG = "megallama.train"
NPROC = 2
AGENT_LINE = re.compile(r"^[EWI]\d{4} \d\d:\d\d:\d\d")  # torch.distributed.elastic's log lines
RANK_EXIT = re.compile(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


@pytest.fixture(scope="module")
def bad(token_files: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A truncated copy of the training tokens, a tokenizer of another vocabulary, a file."""
    root = tmp_path_factory.mktemp("bad")
    with IndexedWriter(root / "trunc", 256) as w:
        w.add_document(list(range(3, 203)))
    data = (root / "trunc.bin").read_bytes()
    (root / "trunc.bin").write_bytes(data[:-10])
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of the little corpus, words and more words."
                                for i in range(400)), encoding="utf-8")
    tokenizer = train_tokenizer([corpus], root / "tok300", 300, num_threads=1)
    return {"trunc": str(root / "trunc"), "tokenizer": str(tokenizer), "file": str(corpus),
            "root": str(root), "tokens": str(token_files)}


ROWS = [  # (id, overrides added to a good 2-rank config, fragment of the error line)
    ("no-data", ["data.train=[]", "data.valid=[]"], "data.train is empty"),
    ("missing-token-file", ["data.train=[{root}/missing]"],
     "data.train[0]={root}/missing: token index not found"),
    ("truncated-token-file", ["data.valid=[{trunc}]"], "data.valid[0]={trunc}: token file"),
    ("tokenizer-vocab-mismatch", ["data.tokenizer={tokenizer}"],
     "data.tokenizer: model vocab_size 256 != tokenizer vocab_size 300"),
    ("unknown-key", ["trainer.stepz=5"], "unknown config key 'trainer.stepz'"),
    ("wrong-type", ["parallel.tp=two"], "bad value for parallel.tp"),
    ("world-not-divisible", ["parallel.tp=3"], "world size 2 is not divisible by tp*pp = 3*1"),
    ("resume-nowhere", ["trainer.resume={root}/nowhere"], "trainer.resume={root}/nowhere"),
    ("init-from-nowhere", ["trainer.init_from={root}/nowhere"], "trainer.init_from={root}/nowhere"),
    ("packing-unknown", ["data.packing=docs"], "data.packing='docs': choose one of ['concat', "),
    ("epochs-negative", ["trainer.epochs=-1"], "trainer.epochs=-1.0: must be >= 0"),
    ("output-dir-on-file", ["trainer.output_dir={file}"],
     "trainer.output_dir={file} is a file, not a directory"),
    ("seq-len-too-long", ["data.seq_len=4096"], "data.seq_len=4096 > model.max_seq_len"),
    ("micro-batch-zero", ["parallel.micro_batch_size=0"], "parallel.micro_batch_size=0"),
    ("steps-negative", ["trainer.steps=-1"], "trainer.steps=-1: must be >= 1"),
    ("eval-iters-zero", ["trainer.eval_iters=0"], "trainer.eval_iters=0: must be >= 1"),
    ("lr-negative", ["optim.lr=-0.001"], "optim.lr=-0.001"),
]


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def ranks_output(stderr: str) -> str:
    """The ranks' part of torchrun's stderr: everything before the agent's failure report."""
    lines = stderr.splitlines()
    end = next((i for i, line in enumerate(lines) if AGENT_LINE.match(line)), len(lines))
    return "\n".join(lines[:end])


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_config_error_is_one_line_on_every_rank(row, bad, token_files, tmp_path) -> None:
    name, extra, message = row
    out = tmp_path / "run"
    args = overrides(token_files, out, *(e.format(**bad) for e in extra))
    before = tree_hash(token_files), tree_hash(Path(bad["root"]))
    env = {"MEGALLAMA_DEBUG": ""}
    proc, seconds = torchrun(NPROC, "megallama.train", args, env=env, timeout=180)
    assert proc.returncode != 0 and seconds < 120, f"{name}: {seconds:.0f} s"
    exits = dict(RANK_EXIT.findall(proc.stderr))
    assert "2" in exits.values() and set(exits.values()) <= {"2", "-15"}, proc.stderr[-3000:]
    ours = ranks_output(proc.stderr)
    assert "Traceback" not in ours, ours
    last = ours.strip().splitlines()[-1] if ours.strip() else ""
    assert last.startswith(f"{PROG}: error: ") and message.format(**bad) in last, ours
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"{PROG}: error:")]
    assert set(errors) == {last} and len(errors) <= NPROC, errors
    assert not out.exists()
    assert (tree_hash(token_files), tree_hash(Path(bad["root"]))) == before


def test_a_rank_alone_fails_without_waiting_for_its_peers(bad, token_files, tmp_path) -> None:
    """Rank 1 of 2 started without rank 0 (nobody serves the rendezvous): it still fails with
    the line and status 2 within seconds, so every check, trainer.resume the last, runs before
    any collective; it reports after PEER_REPORT_DELAY_S, as rank 0 is not there to."""
    args = overrides(token_files, tmp_path / "run", f"trainer.resume={bad['root']}/nowhere")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": "1", "LOCAL_RANK": "1",
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "9"}
    env.pop("MEGALLAMA_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", PROG, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"{PROG}: error: trainer.resume={bad['root']}/nowhere"), proc.stderr
    assert not (tmp_path / "run").exists()

"""The lm-evaluation-harness model ``megallama``: benchmark scores of a megallama, Meta or Hugging
Face checkpoint at any (tp, pp), on the inference loader (no DeepSpeed, no optimizer state).

Importing this module registers the model with lm-eval (``python -m megallama.lm_eval --model
megallama --model_args checkpoint=DIR,tp=2 ...``, under ``torchrun`` with tp * pp ranks).

Every rank runs every request, in the same order: TP and PP collectives need all ranks of the
model to run the same batches. The model therefore tells lm-eval rank 0 of a world of 1 (lm-eval
would otherwise hand each rank other documents), and lm-eval >= 0.4.13 writes results only where
``rank == 0`` and ``LOCAL_RANK == 0``; other global ranks are given a non-zero ``LOCAL_RANK`` so
that exactly one process (global rank 0) reports. Scores are computed on the last pipeline stage
and broadcast to the others, so every rank returns the same answers.

Tokens are those of lm-eval's ``hf`` model on the HF export of the same checkpoint: text is
encoded with transformers' tokenizer built from the checkpoint's tokenizer files (written the way
``megallama-reshard --to hf`` writes them), and BOS, the empty-context prefix, context/continuation
splits, rolling windows, truncation and stop sequences follow ``HFLM`` step by step. (transformers'
Llama BPE differs from SentencePiece on runs of spaces and on leading spaces, so SentencePiece
itself would not give the ``hf`` scores.)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

try:
    import lm_eval.models  # noqa: F401  (registers the built-in models, ``hf`` among them)
    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import (
        Collator,
        handle_stop_sequences,
        normalize_gen_kwargs,
        postprocess_generated_text,
    )
    from lm_eval.utils import (
        get_rolling_token_windows,
        make_disjoint_window,
        simple_parse_args_string,
    )
except ImportError as e:  # only this model needs them: say how to get them, in one line
    raise ImportError(f"the lm-eval model 'megallama' needs lm-evaluation-harness ({e.name} is "
                      "missing): pip install 'megallama[eval]'") from None

from megallama.config import ConfigError, ModelConfig
from megallama.inference.generation import Sampling, generate
from megallama.inference.harness_args import (
    batch_size_arg,
    bool_arg,
    check_keys,
    checked_model,
    device_arg,
    int_arg,
    max_length_arg,
    model_arg_keys,
)
from megallama.inference.loader import PRECISIONS, load_for_inference
from megallama.interop.hf import write_hf_tokenizer
from megallama.parallel import mappings

Request = tuple[Any, list[int], list[int]]  # ((context, continuation) or None, context, continuation)
DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}
_PLACEHOLDER = torch.zeros(1, 1, 1)  # Collator.get_cache only expands it; the scores are ours


class _StopSequencesReached(Exception):
    """Raised by every rank at the same decoding step once every sequence ended: stops
    :func:`generate` early (all ranks hold the same tokens, so all raise together)."""


def load_tokenizer(checkpoint: Path, fmt: str, found: Path | None, override: str | None,
                   add_bos_token: bool | None, cfg: ModelConfig) -> Any:
    """transformers' tokenizer of a checkpoint, as lm-eval's ``hf`` model loads it from the HF
    export: an HF directory (the checkpoint itself, or ``override``) is read as it is; a
    SentencePiece ``tokenizer.model`` gets the tokenizer config ``megallama-reshard`` writes."""
    kwargs: dict[str, Any] = {"use_fast": True}
    if add_bos_token is not None:
        kwargs["add_bos_token"] = add_bos_token
    source = Path(override) if override else (checkpoint if fmt == "hf" else found)
    if source is None:
        raise ConfigError(f"{checkpoint}: no tokenizer.model beside the weights; pass "
                          "tokenizer=PATH in --model_args")
    if source.is_dir():
        return transformers.AutoTokenizer.from_pretrained(str(source), **kwargs)
    with tempfile.TemporaryDirectory(prefix="megallama-tokenizer-") as tmp:
        write_hf_tokenizer(source, Path(tmp), cfg)
        return transformers.AutoTokenizer.from_pretrained(tmp, **kwargs)


@register_model("megallama")
class MegallamaLM(TemplateLM):
    """A checkpoint (``checkpoint``, ``format`` megallama / meta / hf) at (``tp``, ``pp``) as an
    lm-eval causal LM: ``loglikelihood``, ``loglikelihood_rolling`` and greedy or sampled
    ``generate_until``, in batches of ``batch_size`` requests.

    The arguments are ``--model_args`` (and lm-eval's ``--batch_size`` / ``--device``;
    ``max_batch_size`` is accepted and unused): ``dtype`` fp32 or bf16; ``max_length`` the
    context (default the model's); ``tokenizer`` a ``tokenizer.model`` or HF tokenizer directory
    (default: beside the weights); ``add_bos_token`` and ``prefix_token_id`` as for lm-eval's
    ``hf`` model; ``seed`` seeds sampling (``do_sample``), alike on every rank."""

    def __init__(self, checkpoint: str, format: str = "megallama", tp: int = 1, pp: int = 1,
                 dtype: str = "fp32", device: str | None = None, batch_size: int | str = 1,
                 max_batch_size: int | None = None, max_length: int | None = None,
                 max_gen_toks: int = 256, tokenizer: str | None = None,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 seed: int = 1234) -> None:
        super().__init__()
        if str(dtype) not in DTYPE_NAMES:
            raise ConfigError(f"--model_args dtype={dtype!r}: expected one of "
                              f"{', '.join(DTYPE_NAMES)}")
        self._batch_size = batch_size_arg(batch_size)
        self._max_gen_toks = int_arg("max_gen_toks", max_gen_toks, 1)
        self._seed = int_arg("seed", seed, 0)
        add_bos_token = bool_arg("add_bos_token", add_bos_token)
        if prefix_token_id is not None:
            prefix_token_id = int_arg("prefix_token_id", prefix_token_id, 0)
        self._device = device_arg(device)
        cfg, tp, pp = checked_model(checkpoint, format, tp, pp)
        self._max_length = max_length_arg(max_length, cfg)
        self.model = load_for_inference(Path(checkpoint), format, tp=tp, pp=pp,
                                        dtype=PRECISIONS[DTYPE_NAMES[str(dtype)]],
                                        device=self._device)
        self.cfg = self.model.cfg
        self.tokenizer = load_tokenizer(Path(checkpoint), format, self.model.tokenizer, tokenizer,
                                        add_bos_token, self.cfg)
        if len(self.tokenizer) > self.cfg.vocab_size:
            raise ConfigError(f"tokenizer of {len(self.tokenizer)} tokens does not fit the "
                              f"model's vocabulary of {self.cfg.vocab_size}")
        self.add_bos_token, self.custom_prefix_token_id = add_bos_token, prefix_token_id
        self.info = {"checkpoint": str(checkpoint), "format": format, "tp": tp, "pp": pp,
                     "dtype": DTYPE_NAMES[str(dtype)]}
        _report_on_global_rank_zero_only()

    @classmethod
    def create_from_arg_string(cls, arg_string: str,
                               additional_config: dict[str, Any] | None = None) -> MegallamaLM:
        """lm-eval's constructor from ``--model_args k=v,...``, with the keys checked first."""
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any],
                            additional_config: dict[str, Any] | None = None) -> MegallamaLM:
        """``cls(**arg_dict, **lm-eval's options)`` after :func:`check_keys`: an unknown,
        repeated or missing key is one line naming it, not a TypeError."""
        options = {k: v for k, v in (additional_config or {}).items() if v is not None}
        check_keys(arg_dict, options, model_arg_keys(cls.__init__))
        return cls(**arg_dict, **options)

    # ---- what lm-eval reads ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        """The context of an empty-context request and of the first rolling window (as HFLM)."""
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        bos = self.tokenizer.bos_token_id
        return int(bos if bos is not None else self.tokenizer.eos_token_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        """Names the tokenizer in lm-eval's request cache keys (chat templates)."""
        return str(self.info["checkpoint"]).replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        """Written into the results' config: what was evaluated, and in which layout."""
        return dict(self.info)

    # ---- tokens --------------------------------------------------------------------------------
    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
        """HFLM's rule: the tokenizer's own BOS setting unless told, and no second BOS for a
        text that already starts with one."""
        special: dict[str, bool] = {}
        if add_special_tokens is not None:
            special["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            special["add_special_tokens"] = self.add_bos_token
        if add_special_tokens is None and string.startswith(
                self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: int | Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- loglikelihood -------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of continuation log-probabilities, whether greedy decoding gives the
        continuation) per request. Longest first in batches, a context shared by one-token
        continuations run once (lm-eval's Collator, as HFLM)."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                         group_by="contexts", group_fn=lambda r: r[-2] + r[-1][:-1])
        results: list[tuple[float, bool]] = []
        for chunk in order.get_batched(n=self.batch_size):
            for key, answer in self._score_chunk(chunk, order):
                results.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return order.get_original(results)

    def _score_chunk(self, chunk: Sequence[Request], order: Collator) -> list[tuple[Any, tuple[float, bool]]]:
        """One forward of a right-padded batch; the answers of every request it serves."""
        inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
        tokens = torch.zeros(len(inputs), max(map(len, inputs)), dtype=torch.long)
        for i, row in enumerate(inputs):
            tokens[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        with torch.no_grad():
            logits = self.model(tokens.to(self.model.device))
        logprobs = self._continuation_logprobs(logits, [len(r) for r in inputs],
                                               max(len(c) for _, _, c in chunk))
        served = []  # (row, cache key, continuation) of every request this batch answers
        for i, (key, ctx, cont) in enumerate(chunk):
            for k, cont_toks, _ in order.get_cache(req_str=key, cxt_toks=ctx, cont_toks=cont,
                                                   logits=_PLACEHOLDER):
                served.append((i, k, list(cont_toks)))
        scores = torch.zeros(len(served), 2, dtype=torch.float64, device=self.model.device)
        if logprobs is not None:
            for j, (i, _, cont) in enumerate(served):
                row = logprobs[i, logprobs.shape[1] - len(cont):]
                target = torch.tensor(cont, device=row.device)
                scores[j, 0] = row.gather(-1, target[:, None]).sum().double()
                scores[j, 1] = float(bool((row.argmax(-1) == target).all()))
        scores = self.model.broadcast_from_last(scores).tolist()
        return [(k, (s[0], bool(s[1]))) for (_, k, _), s in zip(served, scores, strict=True)]

    def _continuation_logprobs(self, logits: torch.Tensor | None, lengths: list[int],
                               width: int) -> torch.Tensor | None:
        """fp32 log-softmax over the true vocabulary at the last ``width`` input positions of
        every row ([b, width, vocab]; rows shorter than ``width`` repeat position 0 on the left,
        never read). Only these positions are gathered over TP, not the whole sequence."""
        if logits is None:  # not the last pipeline stage
            return None
        ends = torch.tensor(lengths, device=logits.device)[:, None]
        positions = (ends - width + torch.arange(width, device=logits.device)).clamp(min=0)
        picked = logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))
        full = mappings.gather_from_tp(picked.contiguous(), self.model.tp.group)
        return full[..., :self.cfg.vocab_size].float().log_softmax(-1)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in disjoint windows of ``max_length`` tokens (the first
        conditioned on the prefix token), as HFLM scores them."""
        windows: list[Request] = []
        counts = []
        for (text,) in (req.args for req in requests):
            pieces = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            windows.extend((None, ctx, cont) for ctx, cont in pieces)
            counts.append(len(pieces))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=True)
        totals, start = [], 0
        for req, n in zip(requests, counts, strict=True):
            total = sum(s for s, _ in scores[start:start + n])
            start += n
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ----------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Continuations until a stop sequence, EOS or ``max_gen_toks`` new tokens; requests
        sharing generation settings batched longest first (HFLM's order)."""
        order = Collator([req.args for req in requests],
                         sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                         group_by="gen_kwargs", group_fn=lambda r: r[1])
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        results: list[str] = []
        for chunk in order.get_batched(n=self.batch_size):
            contexts, settings = zip(*chunk, strict=True)
            kwargs = normalize_gen_kwargs(dict(settings[0]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            new = int(kwargs.pop("max_gen_toks"))
            if new >= self.max_length:
                raise ConfigError(f"max_gen_toks={new} leaves no room for a context in "
                                  f"max_length={self.max_length}")
            prompts = [self.tok_encode(c, left_truncate_len=self.max_length - new)
                       for c in contexts]
            for context, text in zip(contexts, self._generate(prompts, new, until, kwargs),
                                     strict=True):
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, settings[0]), text)
        return order.get_original(results)

    def _sampling(self, kwargs: dict[str, Any]) -> Sampling:
        """Greedy unless ``do_sample``; sampling is seeded alike on every rank."""
        if not kwargs.get("do_sample"):
            return Sampling()
        return Sampling(temperature=float(kwargs.get("temperature") or 0.0),
                        top_k=int(kwargs.get("top_k") or 0),
                        top_p=float(kwargs.get("top_p") or 1.0), seed=self._seed)

    def _generate(self, prompts: list[list[int]], new: int, until: list[str],
                  kwargs: dict[str, Any]) -> list[str]:
        """Decode the batch, stopping once every sequence has met EOS or a stop sequence, and
        cut each text at its first stop sequence."""
        steps: list[list[int]] = []

        def on_step(tokens: torch.Tensor) -> None:
            steps.append(tokens.tolist())
            if all(self._ended([s[i] for s in steps], until) for i in range(len(prompts))):
                raise _StopSequencesReached

        try:
            outs = generate(self.model, prompts, new, self._sampling(kwargs),
                            eos_id=self.eot_token_id, on_step=on_step)
        except _StopSequencesReached:
            outs = [self._until_eos([s[i] for s in steps]) for i in range(len(prompts))]
        return [postprocess_generated_text(self.tok_decode(o), until, None) for o in outs]

    def _until_eos(self, row: list[int]) -> list[int]:
        return row[:row.index(self.eot_token_id)] if self.eot_token_id in row else row

    def _ended(self, row: list[int], until: list[str]) -> bool:
        if self.eot_token_id in row:
            return True
        text = self.tok_decode(row)
        return any(stop and stop in text for stop in until)


def _report_on_global_rank_zero_only() -> None:
    """lm-eval writes results on every process with rank 0 (all of ours) and LOCAL_RANK 0: on a
    second node that is not global rank 0, so its LOCAL_RANK is made non-zero (the device was
    chosen already)."""
    if dist.is_initialized() and dist.get_rank() != 0 and os.environ.get("LOCAL_RANK", "0") == "0":
        os.environ["LOCAL_RANK"] = str(dist.get_rank())


__all__ = ["MegallamaLM", "load_tokenizer"]

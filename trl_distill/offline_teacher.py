"""Offline teacher: score a dataset with the teacher once, store its top-k log-probs, distill later without it.

    trl-distill teacher-topk --teacher outputs/addition/teacher --dataset addition --top_k 64 \\
        --output_dir outputs/addition_top64
    # then: GKDVariant(model, teacher_model=None, train_dataset=load_teacher_topk("outputs/addition_top64"), ...)

Per completion token (a position whose label is not -100 in the trainer's own collator) the stored columns are:

- ``teacher_topk_ids``: the teacher's k most likely next-token ids (int32),
- ``teacher_topk_logprobs``: their log-probabilities at the loss temperature (float32, descending),
- ``teacher_rest_logprobs``: the log of the mass outside those k tokens (log-sum-exp, not ``log(1 - sum)``),
- ``teacher_token_ids``: the completion token itself, so training can check that it reads the same tokens.

Preference data (``prompt``/``chosen``/``rejected``, for `DistillDPOTrainer` ``mode="dckd"``) gets these four columns
for each completion, prefixed ``chosen_`` and ``rejected_`` (``chosen_teacher_topk_ids``, ...), plus
``chosen_teacher_logps`` / ``rejected_teacher_logps``: the teacher's log-probability of the whole (truncated)
completion at temperature 1, which the trainer uses as DPO's reference log-probs (the teacher is the reference).
Positions are those of ``completion_mask[:, 1:]`` in TRL's ``DataCollatorForPreference``, after TRL's own tokenization.

The dataset is written in shards (``output_dir/shards/shard-00000`` ...), each an Arrow dataset written to a
temporary folder and renamed when complete, so a killed run resumes without rescoring finished shards. The run's
metadata (teacher, revision, temperature, k, tokenizer fingerprint, max_length, ...) is ``output_dir/teacher_topk.json``
and travels with the loaded dataset (``dataset.info.description``); trainers refuse a dataset whose tokenizer,
temperature, k or max_length does not match their run. Several processes (``accelerate launch``) score disjoint shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from . import losses

METADATA_FILE = "teacher_topk.json"
SHARDS_DIR = "shards"
# The key under which the metadata sits in `Dataset.info.description` (a JSON object).
_INFO_KEY = "trl_distill_teacher_topk"
TEACHER_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_rest_logprobs", "teacher_token_ids")
COMPLETIONS = ("chosen", "rejected")  # the two completions of a preference row, in TRL's [chosen; rejected] order
# Preference data: the columns above per completion, plus its sequence log-prob (the DPO reference).
PREFERENCE_TEACHER_COLUMNS = tuple(
    f"{side}_{name}" for side in COMPLETIONS for name in (*TEACHER_COLUMNS, "teacher_logps")
)
# Fields of the metadata that must equal those of the run that resumes an interrupted scoring.
_RESUME_FIELDS = ("teacher", "teacher_revision", "teacher_adapter", "teacher_quantization", "temperature", "top_k",
                  "tokenizer_fingerprint", "max_length", "vocab_size", "format", "num_rows", "shard_size",
                  "data_fingerprint", "truncation_mode")


@dataclass
class StoredTeacherInfo:
    """What a stored (offline) teacher dataset was scored with; saved as ``teacher_topk.json``."""

    teacher: str
    teacher_revision: str | None
    teacher_adapter: str | None
    teacher_quantization: str | None
    temperature: float
    top_k: int
    tokenizer_fingerprint: str
    max_length: int
    vocab_size: int  # the vocabulary columns the log-probs are normalised over
    format: str  # "messages" (GKDVariant) or "preference" (DistillDPOTrainer)
    num_rows: int
    shard_size: int
    data_fingerprint: str
    trl_distill_version: str = ""
    truncation_mode: str | None = None  # preference data: DPOConfig.truncation_mode of the collator

    @property
    def teacher_columns(self) -> tuple[str, ...]:
        return PREFERENCE_TEACHER_COLUMNS if self.format == "preference" else TEACHER_COLUMNS

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoredTeacherInfo:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def storage_bytes_per_token(top_k: int) -> int:
    """Arrow payload per completion token: k int32 ids + k float32 log-probs (fixed-size lists: no offsets) + the
    float32 rest + the int32 token; per-row list offsets come on top. Measured on disk in
    ``benchmarks/offline_teacher.py`` (within 2 bytes per token at 40 tokens per row)."""
    return 8 * top_k + 8


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A SHA-256 over what decides token ids and chat formatting: the vocabulary, the special tokens and the chat
    template. Two tokenizers with the same fingerprint tokenize a conversation identically."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's tokenizer
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {key: str(value) for key, value in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
        "class": type(tokenizer).__name__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _data_fingerprint(dataset, columns: tuple[str, ...]) -> str:
    """A SHA-256 of the scored columns' content (not `datasets`' own fingerprint, which is random for in-memory
    datasets): a resumed run must score the same rows."""
    digest = hashlib.sha256()
    for column in columns:
        for value in dataset[column]:
            digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _dataset_format(dataset) -> tuple[str, tuple[str, ...]]:
    """("messages" or "preference", the columns that are scored)."""
    columns = set(dataset.column_names)
    if "messages" in columns:
        return "messages", ("messages",)
    if {"chosen", "rejected"} <= columns:
        return "preference", tuple(name for name in ("prompt", "chosen", "rejected") if name in columns)
    raise ValueError(
        f"teacher-topk scores GKDVariant's format (a `messages` column: conversations ending with the completion) or "
        f"DistillDPOTrainer's (`prompt`/`chosen`/`rejected`, or `chosen`/`rejected`); the dataset has columns "
        f"{sorted(columns)}."
    )


def _chat_collator(tokenizer, max_length: int | None):
    """The collator GKDVariant trains with: same tokenization, truncation (keeps the last `max_length` tokens) and
    labels, so the stored positions are exactly the positions the trainer computes its loss on."""
    from trl.experimental.utils import DataCollatorForChatML

    return DataCollatorForChatML(tokenizer=tokenizer, max_length=max_length)


def _preference_collator(tokenizer, max_length: int | None, truncation_mode: str):
    """The collator DistillDPOTrainer (TRL's DPOTrainer) trains with: `[chosen; rejected]` rows, each prompt +
    completion truncated to `max_length` per `truncation_mode`, then right-padded (pads never reach a kept position)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return DataCollatorForPreference(pad_token_id=pad_id if pad_id is not None else 0, max_length=max_length,
                                     truncation_mode=truncation_mode)


def _tokenize_preference(tokenizer, dataset):
    """TRL's own DPO tokenization (`prompt_ids`/`chosen_ids`/`rejected_ids`: prompt extracted when absent, EOS added
    to non-conversational completions, completion starting where prompt and prompt+completion diverge), row for row.

    The trainer re-runs exactly this on the stored dataset, so reusing it (rather than a copy that could drift) makes
    the stored positions line up by construction; the collator still checks every token. Every row is kept: the
    trainer's filter of rows whose prompt alone fills `max_length` drops them from training, and their stored lists
    are simply empty.
    """
    from ._compat import tokenize_preference_dataset

    return tokenize_preference_dataset(tokenizer, dataset, "teacher-topk")


@torch.no_grad()
def _score_positions(teacher, input_ids, attention_mask, positions, top_k: int, temperature: float, columns: int,
                     sequence_logps: bool = False, chunk_rows: int = 1024) -> dict[str, list]:
    """Teacher top-k entries at the `[B, L-1]` boolean `positions` (position t predicts token t+1), one list per row;
    with `sequence_logps`, also `teacher_logps`: per row the sum of the teacher's log-probs of the tokens at
    `positions` at temperature 1 over its whole head, as TRL computes a DPO reference's log-probs."""
    from .teacher import backbone_hidden_states, output_head

    device = next(teacher.parameters()).device
    input_ids, attention_mask, positions = input_ids.to(device), attention_mask.to(device), positions.to(device)
    hidden = backbone_hidden_states(teacher, input_ids, attention_mask)[:, :-1][positions]  # [N, H]
    tokens = input_ids[:, 1:][positions]
    head = output_head(teacher)
    ids, logprobs, rest, token_logps = [], [], [], []
    for start in range(0, hidden.shape[0], chunk_rows):  # bounds the [rows, V] logits
        logits = head(hidden[start:start + chunk_rows].to(head.weight.dtype))
        stored = losses.teacher_topk(logits[:, :columns], top_k, temperature)
        ids.append(stored.ids.to(torch.int32).cpu())
        logprobs.append(stored.logprobs.float().cpu())
        rest.append(stored.rest_logprobs.float().cpu())
        if sequence_logps:
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
            token_logps.append(wide.log_softmax(-1).gather(-1, tokens[start:start + chunk_rows, None])[:, 0].cpu())
    ids = torch.cat(ids) if ids else torch.zeros(0, top_k, dtype=torch.int32)
    logprobs = torch.cat(logprobs) if logprobs else torch.zeros(0, top_k)
    rest = torch.cat(rest) if rest else torch.zeros(0)
    counts = positions.sum(dim=1).tolist()
    out = {name: [] for name in TEACHER_COLUMNS}
    pieces = (ids.split(counts), logprobs.split(counts), rest.split(counts), tokens.to(torch.int32).cpu().split(counts))
    for piece in zip(*pieces):
        for name, tensor in zip(TEACHER_COLUMNS, piece):
            out[name].append(tensor.tolist())
    if sequence_logps:
        token_logps = torch.cat(token_logps) if token_logps else torch.zeros(0, dtype=torch.float64)
        out["teacher_logps"] = [float(part.double().sum()) for part in token_logps.split(counts)]
    return out


def _score_batch(teacher, collator, rows: list[dict], top_k: int, temperature: float, columns: int) -> dict[str, list]:
    """Teacher top-k entries of every completion token of `rows` (GKDVariant's `messages` format)."""
    batch = collator(rows)
    return _score_positions(teacher, batch["input_ids"], batch["attention_mask"], batch["labels"][:, 1:] != -100,
                            top_k, temperature, columns)


def _score_preference_batch(teacher, collator, rows: list[dict], top_k: int, temperature: float,
                            columns: int) -> dict[str, list]:
    """Teacher top-k entries and sequence log-probs of both completions of tokenized preference `rows`."""
    batch = collator(rows)  # [chosen; rejected]
    positions = batch["completion_mask"][:, 1:] == 1
    scored = _score_positions(teacher, batch["input_ids"], batch["attention_mask"], positions, top_k, temperature,
                              columns, sequence_logps=True)
    half = len(rows)
    return {f"{side}_{name}": values[part]
            for name, values in scored.items()
            for side, part in (("chosen", slice(None, half)), ("rejected", slice(half, None)))}


def _features(dataset, top_k: int, data_format: str = "messages"):
    from datasets import Features, Sequence, Value

    features = dict(dataset.features)
    prefixes = [f"{side}_" for side in COMPLETIONS] if data_format == "preference" else [""]
    for prefix in prefixes:
        features[f"{prefix}teacher_topk_ids"] = Sequence(Sequence(Value("int32"), length=top_k))
        features[f"{prefix}teacher_topk_logprobs"] = Sequence(Sequence(Value("float32"), length=top_k))
        features[f"{prefix}teacher_rest_logprobs"] = Sequence(Value("float32"))
        features[f"{prefix}teacher_token_ids"] = Sequence(Value("int32"))
        if data_format == "preference":
            features[f"{prefix}teacher_logps"] = Value("float32")
    return Features(features)


def _check_resumable(path: Path, info: StoredTeacherInfo, overwrite: bool) -> None:
    """Refuse to mix two different scorings in one output_dir (nothing saved is overwritten silently)."""
    if not path.exists():
        return
    stored = json.loads(path.read_text())
    different = [(name, stored.get(name), getattr(info, name)) for name in _RESUME_FIELDS
                 if stored.get(name) != getattr(info, name)]
    if not different:
        return
    if overwrite:
        shutil.rmtree(path.parent / SHARDS_DIR, ignore_errors=True)
        return
    listing = "; ".join(f"{name}: stored {old!r}, now {new!r}" for name, old, new in different)
    raise ValueError(
        f"{path.parent} already holds teacher scores of a different run ({listing}). Use a new output_dir, or "
        "overwrite=True (`--overwrite_output_dir`) to delete them and start over."
    )


def score_dataset(
    teacher,
    tokenizer,
    dataset,
    output_dir: str | os.PathLike,
    *,
    top_k: int = 64,
    temperature: float = 1.0,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    batch_size: int = 8,
    shard_size: int = 1000,
    teacher_revision: str | None = None,
    teacher_quantization: str | None = None,
    teacher_adapter: str | None = None,
    teacher_model_init_kwargs: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
):
    """Score `dataset` with `teacher` and store its top-k log-probs per completion token (see the module docstring).

    Args:
        teacher: a model, a local path or a Hub id (loaded frozen through :func:`trl_distill.teacher.load_teacher`,
            in 4-bit with ``teacher_quantization="4bit"``, with a frozen PEFT adapter with `teacher_adapter`)
        tokenizer: the tokenizer the student will train with (it must share the teacher's vocabulary)
        dataset: a `datasets.Dataset` in GKDVariant's format (a `messages` column) or DistillDPOTrainer's
            (`prompt`/`chosen`/`rejected`): both completions are scored, with their sequence log-probs
        output_dir: where the shards and ``teacher_topk.json`` go; a rerun with the same settings resumes
        top_k: tokens kept per position (the trainer's `teacher_top_k` must be at most this)
        temperature: the loss temperature the log-probs are taken at (the trainer's `loss_temperature`)
        max_length: the collator's truncation length; must equal the trainer's `max_length` (None: for `messages`
            the collator's default, ``min(tokenizer.model_max_length, 1024)``; for preference data no truncation,
            as TRL's `DPOConfig(max_length=None)`)
        truncation_mode: preference data only: `DPOConfig.truncation_mode` of the run (``"keep_start"``, TRL's
            default, or ``"keep_end"``)
        batch_size: rows per teacher forward
        shard_size: rows per shard (the unit of resumption)
        overwrite: delete the scores of a different run in `output_dir` instead of refusing
        progress: show a progress bar (main process only)

    Returns:
        The scored dataset (:func:`load_teacher_topk` of `output_dir`), on every process once all shards exist.
    """
    from accelerate import PartialState
    from datasets import Dataset
    from tqdm.auto import tqdm

    from . import __version__
    from .teacher import check_vocab_compatible, load_teacher, model_name

    losses._check_top_k(top_k, "top_k")
    losses._check_temperature(temperature)
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value}")
    if not isinstance(dataset, Dataset):
        raise TypeError(f"score_dataset needs a datasets.Dataset, got {type(dataset).__name__}")
    data_format, scored_columns = _dataset_format(dataset)
    if data_format == "preference":
        if truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {truncation_mode!r}")
        collator = _preference_collator(tokenizer, max_length, truncation_mode)
        stored_max_length, stored_truncation = max_length, truncation_mode
    else:
        collator = _chat_collator(tokenizer, max_length)
        stored_max_length, stored_truncation = int(collator.max_length), None
    teacher_label = model_name(teacher)
    state = PartialState()
    model = load_teacher(teacher, quantization=teacher_quantization, adapter=teacher_adapter,
                         model_init_kwargs=teacher_model_init_kwargs,
                         device=None if teacher_quantization else state.device)
    columns = check_vocab_compatible(tokenizer, teacher_model=model)
    if top_k > columns:  # the stored lists have exactly k entries
        raise ValueError(f"top_k={top_k} exceeds the teacher's vocabulary ({columns} tokens): set top_k <= {columns}.")
    info = StoredTeacherInfo(
        teacher=teacher_label, teacher_revision=teacher_revision, teacher_adapter=teacher_adapter and str(teacher_adapter),
        teacher_quantization=teacher_quantization, temperature=float(temperature), top_k=int(top_k),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), max_length=stored_max_length,
        vocab_size=int(columns), format=data_format, num_rows=len(dataset), shard_size=int(shard_size),
        data_fingerprint=_data_fingerprint(dataset, scored_columns), trl_distill_version=__version__,
        truncation_mode=stored_truncation,
    )
    output_dir = Path(output_dir)
    metadata_path = output_dir / METADATA_FILE
    if state.is_main_process:
        _check_resumable(metadata_path, info, overwrite)
        (output_dir / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        metadata_path.write_text(info.to_json())
    state.wait_for_everyone()

    features = _features(dataset, top_k, data_format)
    score_batch = _score_preference_batch if data_format == "preference" else _score_batch
    # Every process tokenizes the whole dataset once, together: TRL's tokenization synchronizes the processes
    # (main process first), so calling it per shard would deadlock when processes score different numbers of shards.
    tokenized = _tokenize_preference(tokenizer, dataset) if data_format == "preference" else dataset
    num_shards = max(1, -(-len(dataset) // shard_size))
    mine = list(range(state.process_index, num_shards, state.num_processes))  # each process scores its shards
    todo = [index for index in mine if not _shard_path(output_dir, index).exists()]
    total_rows = sum(min(shard_size, len(dataset) - index * shard_size) for index in todo)
    bar = tqdm(total=total_rows, desc=f"teacher top-{top_k}", unit="row",
               disable=not (progress and state.is_local_main_process))
    for index in todo:
        start, end = index * shard_size, min((index + 1) * shard_size, len(dataset))
        rows = dataset.select(range(start, end))
        inputs = tokenized.select(range(start, end))
        scored = {name: [] for name in info.teacher_columns}
        for batch_start in range(0, len(rows), batch_size):
            batch = [inputs[i] for i in range(batch_start, min(batch_start + batch_size, len(rows)))]
            for name, values in score_batch(model, collator, batch, top_k, temperature, columns).items():
                scored[name].extend(values)
            bar.update(len(batch))
        shard = Dataset.from_dict({**rows.to_dict(), **scored}, features=features)
        final = _shard_path(output_dir, index)
        staging = final.with_name(final.name + f".tmp-{state.process_index}")
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
        shard.save_to_disk(str(staging))
        os.replace(staging, final)  # a shard exists only once complete
    bar.close()
    state.wait_for_everyone()
    return load_teacher_topk(output_dir)


def _shard_path(output_dir: Path, index: int) -> Path:
    return output_dir / SHARDS_DIR / f"shard-{index:05d}"


def load_teacher_topk(path: str | os.PathLike):
    """The stored-teacher dataset written by :func:`score_dataset` / ``trl-distill teacher-topk`` (all shards, memory
    mapped, in row order), its metadata attached as ``dataset.info.description``. Raises if shards are missing."""
    from datasets import concatenate_datasets, load_from_disk

    path = Path(path)
    metadata_path = path / METADATA_FILE
    if not metadata_path.exists():
        raise FileNotFoundError(f"{path} has no {METADATA_FILE}: not the output of `trl-distill teacher-topk`.")
    info = StoredTeacherInfo.from_dict(json.loads(metadata_path.read_text()))
    num_shards = max(1, -(-info.num_rows // info.shard_size))
    missing = [index for index in range(num_shards) if not _shard_path(path, index).exists()]
    if missing:
        raise ValueError(
            f"{path} is incomplete: {len(missing)} of {num_shards} shards are missing (first: shard {missing[0]}). "
            "Rerun the same `trl-distill teacher-topk` command: it scores only the missing shards."
        )
    dataset = concatenate_datasets([load_from_disk(str(_shard_path(path, index))) for index in range(num_shards)])
    return attach_info(dataset, info)


def is_teacher_topk_dir(path: str | os.PathLike | None) -> bool:
    """Whether `path` is a folder written by `trl-distill teacher-topk` (so `trl-distill gkd --dataset_name path`
    trains from the stored teacher)."""
    return path is not None and (Path(path) / METADATA_FILE).is_file()


def attach_info(dataset, info: StoredTeacherInfo):
    """Record `info` in `dataset.info.description`, where trainers read it (kept by `select`, `shuffle`, `map`)."""
    dataset.info.description = json.dumps({_INFO_KEY: asdict(info)})
    return dataset


def stored_teacher_info(dataset) -> StoredTeacherInfo | None:
    """The metadata of a stored-teacher dataset, or None for a dataset without teacher columns."""
    columns = getattr(dataset, "column_names", None) or []
    if not any(name in columns for name in (*TEACHER_COLUMNS, *PREFERENCE_TEACHER_COLUMNS)):
        return None
    try:
        data = json.loads(dataset.info.description or "")[_INFO_KEY]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(
            "The dataset has stored teacher columns but no metadata: load it with "
            "`trl_distill.offline_teacher.load_teacher_topk(output_dir)`, which attaches what it was scored with."
        ) from None
    info = StoredTeacherInfo.from_dict(data)
    missing = [name for name in info.teacher_columns if name not in columns]
    if missing:
        raise ValueError(f"The stored-teacher dataset lacks the column(s) {missing}; rescore it with teacher-topk.")
    return info


def check_stored_teacher(dataset, dataset_name: str, *, trainer_name: str, tokenizer, temperature: float,
                         top_k: int | None, max_length: int | None, temperature_field: str | None, top_k_field: str,
                         data_format: str = "messages", truncation_mode: str | None = None) -> None:
    """Refuse a stored-teacher dataset that does not match the run, naming the field at fault."""
    info = stored_teacher_info(dataset)
    expected = PREFERENCE_TEACHER_COLUMNS if data_format == "preference" else TEACHER_COLUMNS
    if info is None:
        raise ValueError(
            f"{trainer_name} got teacher_model=None but its {dataset_name} has no stored teacher columns "
            f"{list(expected)}: score it with `trl-distill teacher-topk` (trl_distill.offline_teacher), or "
            "pass a teacher_model."
        )
    where = f"{trainer_name}: the {dataset_name} was scored by {info.teacher!r} with"
    if info.format != data_format:
        kinds = {"messages": "conversations (a `messages` column)", "preference": "preference pairs "
                 "(prompt/chosen/rejected)"}
        raise ValueError(f"{trainer_name}: the {dataset_name} holds a stored teacher of {kinds[info.format]}, but "
                         f"{trainer_name} trains on {kinds[data_format]}. Score the {kinds[data_format]} with "
                         "`trl-distill teacher-topk`.")
    if info.tokenizer_fingerprint != tokenizer_fingerprint(tokenizer):
        raise ValueError(f"{where} a different tokenizer (tokenizer_fingerprint {info.tokenizer_fingerprint[:12]}... "
                         "differs from processing_class's): token ids would not line up. Rescore it with this "
                         "tokenizer.")
    if info.temperature != float(temperature) and temperature_field is None:  # the trainer has no temperature
        raise ValueError(f"{where} temperature={info.temperature}, but {trainer_name}'s KL terms compare the "
                         f"distributions at temperature {temperature}. Rescore it with temperature {temperature}.")
    if info.temperature != float(temperature):
        raise ValueError(f"{where} temperature={info.temperature}, but {temperature_field}={temperature}: the stored "
                         f"log-probs are at the scoring temperature. Set {temperature_field}={info.temperature} or "
                         "rescore.")
    if top_k is None or top_k > info.top_k:
        raise ValueError(f"{where} top_k={info.top_k}, but {top_k_field}={top_k}: a stored teacher holds only its "
                         f"top {info.top_k} tokens. Set {top_k_field} to {info.top_k} (or fewer).")
    if info.max_length != max_length:
        raise ValueError(f"{where} max_length={info.max_length}, but the run truncates at max_length={max_length}: "
                         "the teacher saw other tokens than the student would. Set max_length to "
                         f"{info.max_length} or rescore.")
    if info.truncation_mode != truncation_mode:
        raise ValueError(f"{where} truncation_mode={info.truncation_mode!r}, but the run has truncation_mode="
                         f"{truncation_mode!r}: truncation would keep other tokens than the teacher scored. Set "
                         f"truncation_mode={info.truncation_mode!r} or rescore.")


def check_gkd_run(args, processing_class, trainer_kwargs: dict[str, Any]) -> StoredTeacherInfo:
    """GKDVariant with `teacher_model=None`: the run must be off-policy and match every dataset's stored teacher.
    Returns the train dataset's metadata (eval data, when given, must match the run too)."""
    if trainer_kwargs.get("train_dataset") is None or stored_teacher_info(trainer_kwargs["train_dataset"]) is None:
        raise ValueError(
            "GKDVariant needs a `teacher_model` (a model, a local path or a Hub id) or "
            "`GKDVariantConfig.teacher_model_name_or_path`, or neither with a train_dataset scored by "
            "`trl-distill teacher-topk` (trl_distill.offline_teacher.load_teacher_topk)."
        )
    if args.lmbda != 0:
        raise ValueError(
            f"GKDVariantConfig.lmbda={args.lmbda} makes the student generate completions, which a stored teacher "
            "never scored: with teacher_model=None set lmbda=0 (off-policy), or pass a live teacher_model."
        )
    if args.seq_kd:
        raise ValueError("GKDVariantConfig.seq_kd=True needs a live teacher to generate: with teacher_model=None set "
                         "seq_kd=False, or pass a teacher_model.")
    max_length = _chat_collator(processing_class, args.max_length).max_length
    return _check_every_dataset(trainer_kwargs, trainer_name="GKDVariant", tokenizer=processing_class,
                                temperature=args.loss_temperature, top_k=args.teacher_top_k, max_length=max_length,
                                temperature_field="GKDVariantConfig.loss_temperature",
                                top_k_field="GKDVariantConfig.teacher_top_k")


def _check_every_dataset(trainer_kwargs: dict[str, Any], *, trainer_name: str, **checks) -> StoredTeacherInfo:
    """`check_stored_teacher` on the train dataset and every eval dataset; they must share k (one collator).
    Returns the train dataset's metadata."""
    infos = []
    for name, dataset in (("train_dataset", trainer_kwargs.get("train_dataset")),
                          ("eval_dataset", trainer_kwargs.get("eval_dataset"))):
        for label, part in (dataset.items() if isinstance(dataset, dict) else [(name, dataset)]):
            if part is None:
                continue
            check_stored_teacher(part, label, trainer_name=trainer_name, **checks)
            infos.append((label, stored_teacher_info(part)))
    first_label, first = infos[0]
    for label, info in infos[1:]:
        if info.top_k != first.top_k:
            raise ValueError(f"{trainer_name}: {first_label} stores top_k={first.top_k} but {label} "
                             f"top_k={info.top_k}; score both with the same top_k.")
    return first


def check_dpo_run(args, processing_class, trainer_kwargs: dict[str, Any]) -> StoredTeacherInfo:
    """DistillDPOTrainer with no teacher model: `mode="dckd"` from preference data scored by teacher-topk.

    The KL terms read the stored top-k; DPO's reference log-probs (logged in every mode, trained when
    `dpo_weight > 0`) are the stored teacher's sequence log-probs, fed to TRL as precomputed reference log-probs, so
    no reference model is created or run. Everything that needs the teacher's live outputs is refused, naming the
    field. Returns the train dataset's metadata.
    """
    train = trainer_kwargs.get("train_dataset")
    if train is None or stored_teacher_info(train) is None:
        raise ValueError(
            "DistillDPOTrainer needs a `teacher_model` (a model, a local path or a Hub id) or "
            "`DistillDPOConfig.teacher_model_name_or_path`; or, for mode='dckd', teacher_model=None with a "
            "train_dataset of preference data scored by `trl-distill teacher-topk` "
            "(trl_distill.offline_teacher.load_teacher_topk)."
        )
    if args.mode == "teacher_ref":
        raise ValueError(
            "DistillDPOConfig.mode='teacher_ref' hands a live teacher to TRL as its ref_model; with a stored teacher "
            "(teacher_model=None) use mode='dckd': with dpo_weight > 0 its DPO term takes the stored teacher's "
            "sequence log-probs as the reference (sft_weight, chosen_kd_weight and rejected_kd_weight may be 0)."
        )
    if args.mode == "adpa" or args.adpa_weight:
        raise ValueError(
            f"DistillDPOConfig.mode={args.mode!r} with adpa_weight={args.adpa_weight}: ADPA's advantage needs the "
            "aligned and the reference teacher (adapter on and off) over the student's own responses, which no "
            "stored dataset holds. With teacher_model=None use mode='dckd' and adpa_weight=0, or pass a teacher_model."
        )
    for name in ("teacher_quantization", "teacher_adapter"):
        if getattr(args, name) is not None:
            raise ValueError(f"DistillDPOConfig.{name}={getattr(args, name)!r} describes a teacher to load, but "
                             "teacher_model=None trains from the stored teacher: unset it (it applies when scoring: "
                             "`trl-distill teacher-topk --teacher_quantization/--teacher_adapter`).")
    if args.ld_alpha is not None:
        raise ValueError(f"DistillDPOConfig.ld_alpha={args.ld_alpha}: the stored reference is the teacher's plain sum "
                         "of completion log-probs, not LD-DPO's length-weighted one. Set ld_alpha=None, or pass a "
                         "teacher_model.")
    return _check_every_dataset(trainer_kwargs, trainer_name="DistillDPOTrainer", tokenizer=processing_class,
                                temperature=1.0, top_k=args.teacher_top_k, max_length=args.max_length,
                                temperature_field=None, top_k_field="DistillDPOConfig.teacher_top_k",
                                data_format="preference", truncation_mode=args.truncation_mode)


def stored_vocab_columns(info: StoredTeacherInfo, student_columns: int) -> int:
    """The vocabulary columns a student compares against a stored teacher: the ones the teacher was normalised over,
    which the student's head must cover."""
    if student_columns < info.vocab_size:
        raise ValueError(
            f"The student's output head has {student_columns} rows but the stored teacher's log-probs are over "
            f"{info.vocab_size} vocabulary columns (vocab_size in {METADATA_FILE}): they do not share a vocabulary."
        )
    return info.vocab_size


@dataclass
class StoredTeacherCollator:
    """Wraps a collator that returns `input_ids` and `labels` (TRL's `DataCollatorForChatML`) and adds the stored
    teacher as `[B, L-1, k]` `teacher_topk_ids` / `teacher_topk_logprobs` and `[B, L-1]` `teacher_rest_logprobs`,
    aligned to the positions ``labels[:, 1:] != -100`` (position t predicts token t+1), whatever the padding side.

    Truncation: the collator keeps the end of each sequence, so the stored entries of a truncated row are carried
    as its last entries, the way its labels are. The completion tokens are checked against the stored
    `teacher_token_ids`, so a dataset scored on other tokens fails with a clear error instead of training on
    misaligned targets.
    """

    base: Any
    top_k: int  # the stored k (the loss keeps the `teacher_top_k` most likely of them, the rest joining the rest)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.base(examples)
        positions = batch["labels"][:, 1:] != -100
        rows, length = positions.shape
        ids = torch.zeros(rows, length, self.top_k, dtype=torch.long)
        logprobs = torch.zeros(rows, length, self.top_k, dtype=torch.float32)
        rest = torch.zeros(rows, length, dtype=torch.float32)
        targets = batch["input_ids"][:, 1:]
        for row, example in enumerate(examples):
            where = positions[row].nonzero().squeeze(1)
            stored_tokens = torch.as_tensor(example["teacher_token_ids"], dtype=torch.long)
            count = where.numel()
            if stored_tokens.numel() < count:
                raise ValueError(
                    f"A row has {count} completion tokens but its stored teacher covers {stored_tokens.numel()}: it "
                    "was scored with a shorter max_length or other data. Rescore it with the run's settings."
                )
            keep = slice(stored_tokens.numel() - count, None)  # truncation keeps the end, as for the labels
            if not torch.equal(stored_tokens[keep], targets[row, where]):
                raise ValueError(
                    "The stored teacher_token_ids of a row differ from the tokens the collator produced for it: the "
                    "dataset was scored with another tokenizer, chat template or data. Rescore it."
                )
            ids[row, where] = torch.as_tensor(example["teacher_topk_ids"], dtype=torch.long)[keep]
            logprobs[row, where] = torch.as_tensor(example["teacher_topk_logprobs"], dtype=torch.float32)[keep]
            rest[row, where] = torch.as_tensor(example["teacher_rest_logprobs"], dtype=torch.float32)[keep]
        return {**batch, "teacher_topk_ids": ids, "teacher_topk_logprobs": logprobs, "teacher_rest_logprobs": rest}


@dataclass
class StoredPreferenceTeacherCollator:
    """Wraps TRL's `DataCollatorForPreference` (`[chosen; rejected]` rows with a `completion_mask`) and adds the
    stored teacher of both completions as `[2B, L-1, k]` `teacher_topk_ids` / `teacher_topk_logprobs` and `[2B, L-1]`
    `teacher_rest_logprobs` at the positions ``completion_mask[:, 1:] == 1``, and the stored sequence log-probs as
    TRL's `ref_chosen_logps` / `ref_rejected_logps` (read by `DPOTrainer` with `precompute_ref_log_probs=True`).

    The dataset was scored through this same collator (same `max_length` and `truncation_mode`, checked from the
    metadata), so each completion must keep exactly its stored tokens; any difference fails with a clear error
    instead of training on misaligned targets or a reference of other tokens.
    """

    base: Any
    top_k: int  # the stored k

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.base(examples)
        positions = batch["completion_mask"][:, 1:] == 1
        rows, length = positions.shape
        ids = torch.zeros(rows, length, self.top_k, dtype=torch.long)
        logprobs = torch.zeros(rows, length, self.top_k, dtype=torch.float32)
        rest = torch.zeros(rows, length, dtype=torch.float32)
        targets = batch["input_ids"][:, 1:]
        for row in range(rows):
            side = COMPLETIONS[row // len(examples)]
            example = examples[row % len(examples)]
            where = positions[row].nonzero().squeeze(1)
            stored_tokens = torch.as_tensor(example[f"{side}_teacher_token_ids"], dtype=torch.long)
            if stored_tokens.numel() != where.numel() or not torch.equal(stored_tokens, targets[row, where]):
                raise ValueError(
                    f"The stored {side}_teacher_token_ids of a row ({stored_tokens.numel()} tokens) differ from the "
                    f"{where.numel()} {side} completion tokens the collator produced for it: the dataset was scored "
                    "with another tokenizer, chat template, max_length, truncation_mode or data. Rescore it."
                )
            ids[row, where] = torch.as_tensor(example[f"{side}_teacher_topk_ids"],
                                              dtype=torch.long).reshape(-1, self.top_k)
            logprobs[row, where] = torch.as_tensor(example[f"{side}_teacher_topk_logprobs"],
                                                   dtype=torch.float32).reshape(-1, self.top_k)
            rest[row, where] = torch.as_tensor(example[f"{side}_teacher_rest_logprobs"], dtype=torch.float32)
        references = {f"ref_{side}_logps": torch.tensor([example[f"{side}_teacher_logps"] for example in examples],
                                                       dtype=torch.float32) for side in COMPLETIONS}
        return {**batch, **references, "teacher_topk_ids": ids, "teacher_topk_logprobs": logprobs,
                "teacher_rest_logprobs": rest}


def stored_teacher(inputs: dict[str, torch.Tensor]) -> losses.TopKTeacher:
    """The collated stored teacher of a batch as a `TopKTeacher` over `[B, L-1]` positions."""
    return losses.TopKTeacher(inputs["teacher_topk_ids"], inputs["teacher_topk_logprobs"],
                              inputs["teacher_rest_logprobs"])


# ---------------------------------------------------------------------------------------------------------------
# Command line: trl-distill teacher-topk
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TeacherTopKArguments:
    """Arguments of `trl-distill teacher-topk` (flags and YAML keys); the dataset flags are the trainers' own."""

    teacher: str | None = field(default=None, metadata={"help": "Teacher path or Hub id (required)."})
    dataset: str | None = field(
        default=None, metadata={"help": "Short for --dataset_name: Hub id, path, or 'addition' (the shipped task)."}
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer the student trains with (default: the teacher's)."}
    )
    output_dir: str | None = field(default=None, metadata={"help": "Where the shards and metadata go (required)."})
    top_k: int = field(default=64, metadata={"help": "Teacher tokens stored per completion token."})
    temperature: float = field(default=1.0, metadata={"help": "Loss temperature of the stored log-probs."})
    max_length: int | None = field(
        default=1024, metadata={"help": "Truncation length; must equal the trainer's max_length (TRL's default 1024)."}
    )
    data_format: str = field(
        default="messages",
        metadata={"help": "Shipped addition task only: 'messages' (GKDVariant) or 'preference' (DistillDPOTrainer "
                          "dckd: prompt/chosen/rejected pairs). Other datasets keep the format of their columns."},
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "Preference data: the run's DPOConfig.truncation_mode ('keep_start' or 'keep_end')."},
    )
    batch_size: int = field(default=8, metadata={"help": "Rows per teacher forward."})
    shard_size: int = field(default=1000, metadata={"help": "Rows per shard (the unit of resumption)."})
    teacher_revision: str | None = field(default=None, metadata={"help": "Teacher revision (branch, tag or commit)."})
    teacher_quantization: str | None = field(default=None, metadata={"help": "'4bit' for a bitsandbytes nf4 teacher."})
    teacher_adapter: str | None = field(default=None, metadata={"help": "PEFT adapter loaded (frozen) on the teacher."})
    teacher_dtype: str | None = field(default=None, metadata={"help": "Teacher dtype, e.g. 'bfloat16' (default: auto)."})
    split: str = field(default="train", metadata={"help": "Split to score ('train' or 'test'; 'test' = the eval split)."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Delete the scores of a different run in output_dir instead of refusing."}
    )


def main(argv: list[str]) -> None:
    """`trl-distill teacher-topk`: score a dataset with a teacher and store its top-k log-probs."""
    from transformers import AutoTokenizer
    from trl import TrlParser

    from .cli import DistillScriptArguments, load_datasets, load_preference_datasets

    parser = TrlParser((DistillScriptArguments, TeacherTopKArguments), prog="trl-distill teacher-topk")
    script_args, args = parser.parse_args_and_config(args=argv)
    if args.teacher is None or args.output_dir is None:
        raise SystemExit("trl-distill teacher-topk: --teacher and --output_dir are required.")
    if args.dataset is not None:
        script_args.dataset_name = args.dataset
    if args.data_format not in ("messages", "preference"):
        raise SystemExit(f"trl-distill teacher-topk: --data_format must be 'messages' or 'preference', got "
                         f"{args.data_format!r}.")
    if args.data_format == "preference":
        train, evaluation = load_preference_datasets(script_args, listwise_k=0)
    else:
        train, evaluation = load_datasets(script_args, format="messages")
    dataset = train if args.split == "train" else evaluation
    if dataset is None:
        raise SystemExit(f"trl-distill teacher-topk: the dataset has no {args.split!r} split.")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.teacher, revision=None if args.tokenizer
                                              else args.teacher_revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    init_kwargs = {key: value for key, value in (("revision", args.teacher_revision), ("dtype", args.teacher_dtype))
                   if value is not None}
    scored = score_dataset(
        args.teacher, tokenizer, dataset, args.output_dir, top_k=args.top_k, temperature=args.temperature,
        max_length=args.max_length, truncation_mode=args.truncation_mode, batch_size=args.batch_size,
        shard_size=args.shard_size,
        teacher_revision=args.teacher_revision, teacher_quantization=args.teacher_quantization,
        teacher_adapter=args.teacher_adapter, teacher_model_init_kwargs=init_kwargs or None,
        overwrite=args.overwrite_output_dir,
    )
    tokens = sum(len(row) for column in stored_teacher_info(scored).teacher_columns
                 if column.endswith("teacher_token_ids") for row in scored[column])
    print(f"Stored the teacher's top-{args.top_k} for {len(scored)} rows ({tokens} completion tokens) in "
          f"{args.output_dir}. Load it with trl_distill.offline_teacher.load_teacher_topk({args.output_dir!r}).")

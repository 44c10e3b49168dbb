"""Prompt/response pairs from a local JSONL file, tokenised by a tokenizer from a local folder.

Each line of the file is one JSON object with a prompt and a response (field names are
arguments). A pair becomes one sequence ``prompt tokens + response tokens (+ end token)``,
cut at ``max_length``; its ``labels`` equal the sequence with -100 on the prompt, so only the
response is learned (answer-only fine-tuning). The labels are *not* shifted: as in Hugging
Face's models, the model shifts them (position ``t`` predicts token ``t + 1``).

Nothing is downloaded: the tokenizer is read with ``local_files_only=True`` from a folder that
``save_pretrained`` wrote (``tokenizer.json``, ``tokenizer_config.json``). Needs the optional
extra ``lightning-noise[hf]`` (transformers).

Batches are dicts: ``input_ids`` and ``attention_mask`` ``[B, T]`` (padded on the right to the
longest sequence of the batch), ``labels`` ``[B, T]`` (-100 on the prompt and the padding) and
``index`` ``[B]``, the pair's line position in the file (protocol 1 of the design: per-sample
methods key their statistics on it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_noise._validate import check_int
from lightning_noise.data.base import ResumableSampler

__all__ = ["PromptResponseDataModule", "load_tokenizer", "read_pairs"]


def load_tokenizer(path: str | Path) -> Any:
    """A Hugging Face tokenizer from a local folder (nothing is downloaded).

    Raises:
        FileNotFoundError: when ``path`` is not a folder holding a saved tokenizer.
        ImportError: without transformers, naming the extra to install.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"tokenizer folder {str(folder)!r} does not exist; give the folder that the "
            "tokenizer's save_pretrained wrote (nothing is downloaded)"
        )
    saved = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((folder / name).exists() for name in saved):
        raise FileNotFoundError(
            f"{str(folder)!r} holds no saved tokenizer (none of {saved}); give the folder that "
            "the tokenizer's save_pretrained wrote"
        )
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise ImportError(
            "reading a Hugging Face tokenizer needs transformers: pip install 'lightning-noise[hf]'"
        ) from err
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def read_pairs(path: str | Path, prompt_field: str, response_field: str) -> list[tuple[str, str]]:
    """The ``(prompt, response)`` of every non-empty line of a JSONL file.

    Raises:
        FileNotFoundError: when the file is missing.
        ValueError: naming the line of invalid JSON, a missing or non-text field, or an
            empty file.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"JSONL file {str(file)!r} does not exist")
    pairs = []
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{file}:{number} is not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise ValueError(f"{file}:{number} must be a JSON object, got {type(row).__name__}")
            for field in (prompt_field, response_field):
                if field not in row:
                    raise ValueError(
                        f"{file}:{number} has no field {field!r} (fields: {sorted(row)}); set "
                        "prompt_field / response_field to the names your file uses"
                    )
                if not isinstance(row[field], str):
                    raise ValueError(
                        f"{file}:{number}: field {field!r} must be text, got "
                        f"{type(row[field]).__name__}"
                    )
            pairs.append((row[prompt_field], row[response_field]))
    if not pairs:
        raise ValueError(f"JSONL file {str(file)!r} holds no pairs")
    return pairs


class _Pairs(Dataset):
    def __init__(self, ids: list[list[int]], labels: list[list[int]]) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "labels": self.labels[i], "index": i}


class _Collate:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n] = torch.tensor(item["input_ids"])
            labels[row, :n] = torch.tensor(item["labels"])
            mask[row, :n] = 1
        index = torch.tensor([item["index"] for item in items], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": index}


class PromptResponseDataModule(pl.LightningDataModule):
    """Answer-only fine-tuning data from JSONL prompt/response pairs (see the module docstring).

    Args:
        train_file: JSONL file of the training pairs (required; ``None`` only lets a recipe
            leave it to the command line).
        tokenizer: Folder of a saved Hugging Face tokenizer, usually the model's (required).
        val_file, test_file: Optional JSONL files of held-out pairs.
        prompt_field, response_field: The JSON fields of the prompt and the response.
        max_length: Longest sequence in tokens; longer pairs are cut at the end.
        add_eos: End each response with the tokenizer's end token (when it has one).
        batch_size: Pairs per batch.
        num_workers: DataLoader workers.
        seed: Seed of the training order.

    Raises:
        FileNotFoundError: for a missing file or tokenizer folder.
        ValueError: for a bad line (named), or a pair whose prompt fills ``max_length`` so that
            no response token is left to learn (raise ``max_length`` or shorten the prompt).

    :attr:`num_classes` is the tokenizer's size, which the CLI links to the model.
    """

    def __init__(
        self,
        train_file: str | None = None,
        tokenizer: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        prompt_field: str = "prompt",
        response_field: str = "response",
        max_length: int = 512,
        add_eos: bool = True,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("train_file", train_file), ("tokenizer", tokenizer)):
            if value is None:
                raise ValueError(
                    f"PromptResponseDataModule needs {name} (a local path); on the command line "
                    f"--data.init_args.{name}=PATH"
                )
        self.save_hyperparameters()
        self.max_length = check_int("max_length", max_length, minimum=2)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        self.seed = check_int("seed", seed, minimum=0)
        self.tokenizer = load_tokenizer(tokenizer)
        self.add_eos = bool(add_eos)
        self.prompt_field, self.response_field = prompt_field, response_field
        self._splits = {
            name: self._encode(path)
            for name, path in (("train", train_file), ("val", val_file), ("test", test_file))
            if path is not None
        }
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0  # padded positions are masked anyway
        self._train_indices: Tensor | None = None

    @property
    def train_dataset(self) -> Dataset:
        """The training pairs: items ``{"input_ids", "labels", "index"}``, index = line order."""
        return self._splits["train"]

    def set_train_indices(self, indices: Tensor | Sequence[int] | None) -> None:
        """Serve only these training pairs from now on (``None``: all of them).

        Late Stopping calls it between its rounds: the next :meth:`train_dataloader` iterates
        those pairs only (on every rank), and their ``index`` stays their position in the
        full file.

        Raises:
            ValueError: for an index outside the training pairs, or one that repeats.
        """
        if indices is None:
            self._train_indices = None
            return
        index = torch.as_tensor(indices).reshape(-1)
        if index.dtype.is_floating_point or index.dtype == torch.bool:
            raise ValueError(f"indices must be integers, got dtype {index.dtype}")
        index = index.long().cpu()
        n = len(self.train_dataset)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            raise ValueError(f"indices must be positions in the training pairs [0, {n})")
        if torch.unique(index).numel() != index.numel():
            raise ValueError("indices must not repeat")
        self._train_indices = index.clone()

    @property
    def num_classes(self) -> int:
        """The tokenizer's size (its vocabulary and added tokens), linked to the model."""
        return len(self.tokenizer)

    def _encode(self, path: str) -> _Pairs:
        ids, labels, empty = [], [], []
        eos = self.tokenizer.eos_token_id if self.add_eos else None
        for line, (prompt, response) in enumerate(
            read_pairs(path, self.prompt_field, self.response_field), start=1
        ):
            p = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
            r = list(self.tokenizer(response, add_special_tokens=False)["input_ids"])
            if eos is not None:
                r.append(int(eos))
            sequence = (p + r)[: self.max_length]
            target = ([-100] * len(p) + r)[: self.max_length]
            # The first token is never predicted (nothing precedes it), so a pair needs an
            # answer token after position 0 to teach anything.
            if all(t == -100 for t in target[1:]):
                empty.append(line)
            ids.append(sequence)
            labels.append(target)
        if empty:
            raise ValueError(
                f"{path}: the pairs of lines {empty[:10]}{' ...' if len(empty) > 10 else ''} "
                f"keep no response token within max_length={self.max_length} (the prompt fills "
                "it, or the response is empty); raise max_length or shorten those prompts"
            )
        return _Pairs(ids, labels)

    def _loader(self, split: str, shuffle: bool) -> DataLoader | list:
        if split not in self._splits:
            return []
        dataset: Dataset = self._splits[split]
        if split == "train" and self._train_indices is not None:
            dataset = Subset(dataset, self._train_indices.tolist())
        if not shuffle:
            return DataLoader(
                dataset,
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                collate_fn=_Collate(self.pad_id),
            )
        # The training order is a function of (seed, epoch) (Lightning calls set_epoch on a
        # DistributedSampler it finds, also on one process), split into disjoint shards under
        # DDP; the loader is stateful (torchdata), so a checkpoint taken mid-epoch resumes at
        # the next batch of that epoch's order (as NoisyLabelDataModule's loaders do).
        num_replicas, rank = 1, 0
        kwargs = getattr(self.trainer, "distributed_sampler_kwargs", None)
        if kwargs:
            num_replicas, rank = int(kwargs["num_replicas"]), int(kwargs["rank"])
        sampler = ResumableSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=self.seed
        )
        return StatefulDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_Collate(self.pad_id),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)  # type: ignore[return-value]

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test", shuffle=False)

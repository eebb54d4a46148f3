"""QLoRA SFT from the command line: the same code path as lesson 07, every option a flag.

One process (CPU or one GPU):

    python scripts/sft.py --profile tiny --output-dir artifacts/sft-run

Data-parallel on several processes (each takes its own share of every batch; gradients are
averaged across processes after each backward pass):

    torchrun --nproc_per_node 2 scripts/sft.py --profile tiny --output-dir artifacts/sft-ddp
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/sft.py --profile colab ...

On CPUs the processes talk over gloo; on GPUs over NCCL. The FSDP and DeepSpeed configs in
``configs/accelerate/`` are for multi-GPU machines and are not exercised by CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from course_utils import data, sft  # noqa: E402
from course_utils.profiles import get_profile  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="auto", help="tiny, colab or auto")
    parser.add_argument("--output-dir", required=True, help="where the adapter and logs go")
    optional = {"model_name_or_path": str, "steps": int, "batch_size": int,
                "gradient_accumulation_steps": int, "learning_rate": float, "max_length": int,
                "lora_r": int, "lora_alpha": int, "lora_dropout": float, "optimizer": str,
                "lr_scheduler": str, "warmup_ratio": float, "weight_decay": float,
                "max_grad_norm": float, "logging_steps": int, "seed": int, "train_rows": int}
    for name, kind in optional.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                            help=f"override the profile's {name}")
    for name in ("load_in_4bit", "gradient_checkpointing"):
        parser.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                            default=None, help=f"override the profile's {name}")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    profile = get_profile(args.profile, verbose=rank == 0)
    fields = {f.name for f in dataclasses.fields(sft.SFTSettings)}
    overrides = {k: v for k, v in vars(args).items()
                 if k in fields and k != "output_dir" and v is not None}
    settings = sft.settings_for(profile, args.output_dir, **overrides)
    output = Path(settings.output_dir)
    output.mkdir(parents=True, exist_ok=True)

    model, tokenizer = sft.load_quantized_base(profile, settings)
    train = data.load_sft_dataset(profile, "train")
    if settings.train_rows:
        train = train.select(range(min(settings.train_rows, len(train))))
    trainer = sft.make_trainer(model, tokenizer, train, settings, profile)

    seen_ids: list[int] = []  # the examples this process trained on, to show the data split
    collate = trainer.data_collator

    def recording_collator(examples):
        seen_ids.extend(hash(tuple(e["input_ids"])) for e in examples)
        return collate(examples)

    trainer.data_collator = recording_collator
    start = time.time()
    result = trainer.train()
    seconds = time.time() - start
    adapter_sum = sum(float(p.detach().double().sum()) for p in trainer.model.parameters()
                      if p.requires_grad)  # equal on every rank: DDP keeps the copies in sync
    report = {"rank": rank, "world_size": world_size, "steps": trainer.state.global_step,
              "adapter_checksum": adapter_sum,
              "examples_seen": len(seen_ids), "example_fingerprints": seen_ids,
              "train_loss": result.training_loss, "seconds": seconds,
              "settings": settings.as_dict()}
    (output / f"rank{rank}.json").write_text(json.dumps(report, indent=1) + "\n")
    if trainer.is_world_process_zero():
        trainer.save_model(str(output / "adapter"))
        tokenizer.save_pretrained(str(output / "adapter"))
        print(f"saved the adapter to {output / 'adapter'} after {trainer.state.global_step} steps "
              f"in {seconds:.1f} s on {world_size} process(es); final loss {result.training_loss:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

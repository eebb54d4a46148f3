"""QLoRA SFT from the command line: the same code path and recipe as lesson 07.

Every setting comes from a recipe (``configs/recipes/<profile>/sft.yaml`` unless ``--recipe``
names another file); ``--set section.key=value`` overrides single values, and the script prints
the effective recipe it trains with. One process (CPU or one GPU):

    python scripts/sft.py --profile tiny --output-dir artifacts/sft-run
    python scripts/sft.py --profile tiny --set training.max_steps=20 --set lora.r=8 --output-dir ...
    python scripts/sft.py --recipe my_recipe.yaml --profile tiny --output-dir ...

Data-parallel on several processes (each takes its own share of every batch; gradients are
averaged across processes after each backward pass):

    torchrun --nproc_per_node 2 scripts/sft.py --profile tiny --output-dir artifacts/sft-ddp
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/sft.py --profile colab ...

On CPUs the processes talk over gloo; on GPUs over NCCL. The FSDP and DeepSpeed configs in
``configs/accelerate/`` are for multi-GPU machines and are not exercised by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

import course_utils  # noqa: E402

course_utils.hide_library_notices()  # before qlora_sft imports peft, and peft bitsandbytes
from course_utils import qlora_sft  # noqa: E402
from course_utils.course import data, recipes  # noqa: E402
from course_utils.course.profiles import PROFILE_NAMES, get_profile  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="auto", help="tiny, colab or auto")
    parser.add_argument("--recipe", default=None,
                        help="a recipe file, or a profile name whose sft recipe to use "
                             "(default: configs/recipes/<profile>/sft.yaml)")
    parser.add_argument("--set", dest="changes", action="append", default=[],
                        metavar="SECTION.KEY=VALUE",
                        help="override one recipe value, e.g. --set training.max_steps=20 "
                             "--set lora.r=8 (repeatable; the value is read as YAML)")
    parser.add_argument("--output-dir", required=True, help="where the adapter and logs go")
    parser.add_argument("--train-rows", type=int, default=None,
                        help="train on the first N chats only (a quick run)")
    return parser.parse_args(argv)


def resolve_recipe(args, profile):
    """The recipe named by ``--recipe`` (a file, a profile name, or the profile's own) with every
    ``--set`` applied."""
    source = args.recipe
    if source is None or source in PROFILE_NAMES:
        recipe = recipes.load_recipe("sft", profile if source in (None, "auto") else source)
        if recipe.profile != profile.name:
            raise recipes.RecipeError(
                f"--recipe {source} is the {recipe.profile!r} recipe but the profile is "
                f"{profile.name!r}; pass --profile {recipe.profile} too")
    else:
        recipe = recipes.load_recipe("sft", profile, path=source)
    for assignment in args.changes:
        recipe = recipe.with_changes(**recipes.parse_assignment(assignment))
    return recipe


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    profile = get_profile(args.profile, verbose=rank == 0)
    recipe = resolve_recipe(args, profile)
    if rank == 0:
        print(f"effective recipe ({recipe.label}):\n" + yaml.safe_dump(recipe.as_dict(),
                                                                       sort_keys=False))
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)

    model, tokenizer = qlora_sft.load_quantized_base(profile, recipe)
    train = data.load_sft_dataset(profile, "train")
    if args.train_rows:
        train = train.select(range(min(args.train_rows, len(train))))
    trainer = qlora_sft.make_trainer(model, tokenizer, train, recipe, profile, output / "trainer")

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
              "recipe": recipe.as_dict(), "recipe_file": recipe.label, "train_rows": args.train_rows}
    (output / f"rank{rank}.json").write_text(json.dumps(report, indent=1) + "\n")
    if trainer.is_world_process_zero():
        trainer.save_model(str(output / "adapter"))
        tokenizer.save_pretrained(str(output / "adapter"))
        print(f"saved the adapter to {output / 'adapter'} after {trainer.state.global_step} steps "
              f"in {seconds:.1f} s on {world_size} process(es); final loss {result.training_loss:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

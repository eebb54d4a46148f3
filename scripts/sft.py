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

Fully sharded instead of replicated (FSDP2): ``--fsdp`` gives each process 1/N of every weight,
adapter and optimizer state, gathers a layer's weights just before it computes and
reduce-scatters its gradients after, with the wrapping ``configs/accelerate/fsdp.yaml`` asks of
accelerate (one ``fully_shard`` group per decoder layer, then the whole model):

    torchrun --nproc_per_node 2 scripts/sft.py --profile tiny --fsdp --output-dir artifacts/sft-fsdp

On CPUs the processes talk over gloo; on GPUs over NCCL. CI runs both on two CPU processes:
DDP on the tiny recipe as written (tests/test_qlora_sft.py), and FSDP against DDP on the same
recipe over the unquantized course model (``--set quantization=null``): every weight split in
halves, and fp32 adapters that agree to 1e-4 of each tensor's norm (tests/test_fsdp.py). Not
exercised by CI:

- ``accelerate launch --config_file configs/accelerate/fsdp.yaml``: accelerate builds its FSDP
  plugin only on GPUs; on CPUs it trains plain DDP and ignores ``fsdp=`` without a word, which is
  why ``--fsdp`` calls ``fully_shard`` itself.
- DeepSpeed ZeRO (``configs/accelerate/deepspeed_zero*.yaml``): deepspeed is not installed, and
  accelerate switches DeepSpeed on only off the CPU.
- FSDP over the 4-bit weights. It runs on CPUs (bitsandbytes 0.50, torch 2.13): FSDP2 shards each
  packed NF4 weight like any tensor, in the default uint8 storage as well as a float
  ``bnb_4bit_quant_storage`` (which FSDP1's flat parameters needed), and ``Linear4bit`` re-attaches
  its quantization state after the all-gather; by hand, the per-process losses equal DDP's. But
  trl keeps a 4-bit model's adapters in bf16, where the two runs end up one bf16 step apart,
  about a tenth of what a few steps change: too coarse a comparison for a test.
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
    parser.add_argument("--fsdp", action="store_true",
                        help="shard the model across the processes with FSDP2 (torch's fully_shard: "
                             "each process holds 1/N of every weight, adapter and optimizer state) "
                             "instead of a full copy each; needs torchrun with 2 or more processes")
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


def shard_with_fsdp2(trainer) -> dict[str, list[list[int]]]:
    """Shard ``trainer.model`` (the model with its LoRA adapters) with FSDP2, in place: one
    ``fully_shard`` group per decoder layer, then the root (embeddings, final norm, head).
    Returns, per parameter, its full shape and the shape of this process's shard.

    By hand because accelerate builds its FSDP plugin only on GPUs: given ``fsdp=`` on CPUs it
    wraps the model in DDP instead (accelerate 1.15).
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = trainer.model
    # every process keeps its slice of its own copy: the copies must agree first, as DDP's
    # constructor makes them agree
    with torch.no_grad():
        for parameter in model.parameters():
            dist.broadcast(parameter.data, src=0)
    mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    layer_names = set(model.get_base_model()._no_split_modules)  # LlamaDecoderLayer
    layers = [module for module in model.modules() if type(module).__name__ in layer_names]
    for layer in layers:  # inner groups first: the root takes only what they leave
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # The flag the Trainer reads for a model transformers sharded at load time: it then skips the
    # DDP wrap (DDP refuses DTensor parameters) and leaves gradient reduction to FSDP.
    trainer.is_distributed_loading_by_transformers = True
    return {name: [list(p.shape), list(p.to_local().shape)] for name, p in model.named_parameters()}


def full_trainable_parameters(model) -> dict:
    """Every trainable parameter whole, by name; under FSDP each process gathers the shards of
    the others (a collective: every process must call it)."""
    from torch.distributed.tensor import DTensor

    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
            for name, p in model.named_parameters() if p.requires_grad}


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.fsdp and world_size < 2:
        raise SystemExit("--fsdp shards the model across processes: start it with torchrun "
                         "--nproc_per_node 2 (or more)")
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
    parameter_shards = shard_with_fsdp2(trainer) if args.fsdp else None

    seen_ids: list[int] = []  # the examples this process trained on, to show the data split
    collate = trainer.data_collator

    def recording_collator(examples):
        seen_ids.extend(hash(tuple(e["input_ids"])) for e in examples)
        return collate(examples)

    trainer.data_collator = recording_collator
    start = time.time()
    result = trainer.train()
    seconds = time.time() - start
    adapter = full_trainable_parameters(trainer.model)
    # equal on every rank: DDP keeps the copies in sync, FSDP's shards make one copy
    adapter_sum = sum(float(p.double().sum()) for p in adapter.values())
    report = {"rank": rank, "world_size": world_size, "steps": trainer.state.global_step,
              "fsdp": args.fsdp, "parameter_shards": parameter_shards,
              "adapter_checksum": adapter_sum,
              "examples_seen": len(seen_ids), "example_fingerprints": seen_ids,
              "train_loss": result.training_loss, "seconds": seconds,
              "recipe": recipe.as_dict(), "recipe_file": recipe.label, "train_rows": args.train_rows}
    (output / f"rank{rank}.json").write_text(json.dumps(report, indent=1) + "\n")
    if trainer.is_world_process_zero():
        if args.fsdp:  # the model's own state dict holds this process's shards only
            trainer.model.save_pretrained(str(output / "adapter"), state_dict=adapter)
        else:
            trainer.save_model(str(output / "adapter"))
        tokenizer.save_pretrained(str(output / "adapter"))
        print(f"saved the adapter to {output / 'adapter'} after {trainer.state.global_step} steps "
              f"in {seconds:.1f} s on {world_size} process(es); final loss {result.training_loss:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

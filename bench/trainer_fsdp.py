"""RateConstraintCallback in a transformers Trainer whose model is sharded with FSDP2, on N processes.

    torchrun --nproc_per_node=N bench/trainer_fsdp.py --sharding self          # GPUs: accelerate's FSDP2 plugin
    torchrun --nproc_per_node=2 bench/trainer_fsdp.py --sharding load --device cpu

A Llama of --layers layers, hidden size --hidden, from a config and a fixed seed, trained for --steps steps on
random tokens (the same on every rank) with RateConstraintCallback(RateConstraint(model, ...)), the constraint
built on the sharded model before the Trainer. --sharding picks who shards the model:
- "self": fully_shard per decoder layer and at the root, then Trainer(fsdp="full_shard", fsdp_config
  {"fsdp_version": 2}): on GPUs accelerate's FSDP2 plugin finds an FSDPModule and leaves it (and its parameters,
  which the constraint holds) as it is. With use_cpu accelerate ignores the fsdp arguments and wraps the model in
  DDP, whose first broadcast fails on the DTensor parameters (accelerate 1.16: RuntimeError "aten.cat.default got
  mixed torch.Tensor and DTensor" in DDP's _sync_module_states);
- "load": transformers at load time, from_pretrained(folder, distributed_config=DistributedConfig(fsdp_size=N))
  (the folder written first from the config), which the Trainer leaves unwrapped; this works on CPU with gloo too.
(Letting accelerate shard an unsharded model replaces its parameters inside Trainer.train(): a constraint built
before would hold stale tensors, which RateConstraintCallback refuses at on_train_begin.)
Each rank prints one line, "trainer_fsdp:" and JSON: whether accelerate's FSDP was on, whether the parameters are
DTensors, the losses and the logged R and ν. Exit status 1 when the model trained unsharded or R or ν is not finite.
"""

import argparse
import json
import math
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.distributed import DistributedConfig

from slimrate.backslash import RateConstraint, RateConstraintCallback

RESULT_PREFIX = "trainer_fsdp:"  # the Trainer prints its own dicts


class RandomTokens(Dataset):
    """--samples sequences of 16 random tokens, labels = inputs (causal LM loss), the same on every rank."""

    def __init__(self, samples: int, vocab: int) -> None:
        self.tokens = torch.randint(0, vocab, (samples, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def build_model(args, world_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=128, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if args.sharding == "load":
        with tempfile.TemporaryDirectory() as folder:  # each rank writes the same weights to its own folder
            model.save_pretrained(folder)
            return LlamaForCausalLM.from_pretrained(folder, distributed_config=DistributedConfig(fsdp_size=world_size))
    if args.sharding == "self":
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            model.cuda()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sharding", choices=["self", "load"], default="self")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mode", choices=["loss", "decoupled", "grad"], default="loss")  # grad: older name of loss
    parser.add_argument("--lam", type=float, default=1e-3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--without-rate", action="store_true",
                        help="train without the callback: tells the Trainer's failures from the constraint's")
    parser.add_argument("--out", default=None, help="the Trainer's output folder (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.sharding == "self":  # fully_shard needs the group now; otherwise transformers or accelerate start it
        dist.init_process_group("gloo" if args.device == "cpu" else "nccl")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model = build_model(args, world_size)
    callbacks = [] if args.without_rate else [
        RateConstraintCallback(RateConstraint(model, lam=args.lam, mode=args.mode))]
    fsdp = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": [
        "LlamaDecoderLayer"]}} if args.sharding == "self" else {}
    with tempfile.TemporaryDirectory() as scratch:
        training = TrainingArguments(output_dir=args.out or scratch, use_cpu=args.device == "cpu", max_steps=args.steps,
                                     per_device_train_batch_size=4, logging_steps=1, report_to=[], disable_tqdm=True,
                                     save_strategy="no", ddp_backend="gloo" if args.device == "cpu" else None, **fsdp)
        trainer = Trainer(model=model, args=training, train_dataset=RandomTokens(8 * world_size, 128),
                          callbacks=callbacks)
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    result = {"rank": dist.get_rank() if dist.is_initialized() else 0, "world_size": world_size,
              "sharding": args.sharding, "device": args.device, "fsdp_enabled": trainer.is_fsdp_enabled,
              "dtensor_params": all(isinstance(p, DTensor) for p in trainer.model.parameters()),
              "loss": [e["loss"] for e in logs],
              "backslash_rate": [e.get("backslash_rate") for e in logs],
              "backslash_nu": [e.get("backslash_nu") for e in logs]}
    sys.stdout.flush()  # then the line in one write: the ranks share the pipe, and two lines must not interleave
    os.write(sys.stdout.fileno(), f"{RESULT_PREFIX} {json.dumps(result)}\n".encode())
    finite = all(math.isfinite(v) for v in result["backslash_rate"] + result["backslash_nu"] if v is not None)
    return 0 if result["dtensor_params"] and finite else 1


if __name__ == "__main__":
    sys.exit(main())

"""torchrun worker for test_train_distributed: HFSampler on an FSDP2-sharded tiny model.

Rank 0 generates twice while rank 1 generates nothing, inside one gathered context: this only works
if generation makes no collectives (no FSDP all-gathers per layer, no transformers synced_gpus).
Each rank's completions must equal those of the unsharded model.
"""

import json
import sys

import torch

from wz_engine import distributed as wzdist
from wz_engine.demo.tiny import build_tiny_qwen2, build_tokenizer
from wz_engine.modeling import FusedHeadCausalLM
from wz_engine.packing import pack_rl_batch
from wz_engine.rollout.base import SamplingParams
from wz_engine.rollout.hf import HFSampler
from wz_engine.update import model_inputs

info = wzdist.init_distributed("gloo")
tok = build_tokenizer(["the sea and the quiet river at night"] * 4, 300)
kw = dict(hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64, eos_token_id=tok.eos_token_id,
          pad_token_id=tok.pad_token_id, seed=1)
reference = HFSampler(build_tiny_qwen2(len(tok), **kw), tok)
lm = build_tiny_qwen2(len(tok), **kw)
root = wzdist.shard_model(FusedHeadCausalLM(lm), lm, info)
with torch.no_grad():
    root(**model_inputs(pack_rl_batch([[0]], [[]], 8)[0], root.config))  # FSDP root initialisation
sampler = HFSampler(lm, tok, gather=lambda: wzdist.gathered_for_generation(root))
params = SamplingParams(max_new_tokens=6, n=2, seed=5)
prompts = [tok("the sea")["input_ids"], tok("a quiet river")["input_ids"]]
same = True
with wzdist.gathered_for_generation(root):
    for _ in range(2 if info.rank == 0 else 0):
        got = [[c.token_ids for c in g] for g in sampler.generate(prompts, params)]
        want = [[c.token_ids for c in g] for g in reference.generate(prompts, params)]
        same &= got == want
same &= [[c.token_ids for c in g] for g in sampler.generate(prompts, params)] == \
    [[c.token_ids for c in g] for g in reference.generate(prompts, params)]  # outside: gathers itself
wzdist.barrier()
json.dump({"rank": info.rank, "same": same}, open(f"{sys.argv[1]}/rank{info.rank}.json", "w"))
wzdist.shutdown()

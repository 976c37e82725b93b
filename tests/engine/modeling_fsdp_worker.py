"""torchrun worker for test_modeling.py: FusedHeadCausalLM under FSDP2 on CPU (gloo, 2 ranks).

`torchrun --standalone --nproc_per_node=2 tests/engine/modeling_fsdp_worker.py OUT.pt`
Shards each decoder layer, then the wrapper as the root (the trainer's layout), runs fused logprobs
(+ entropy) and one backward on the same packed batch on every rank, and rank 0 saves the outputs and
the full (unsharded) gradients for the test to compare with a 1-process unsharded run.
The tiny-model and batch builders here are shared with the test so both sides build the same thing.
"""

import sys

import torch

IGNORE = -100


def tiny_model(tied: bool, dtype=torch.float32, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).to(dtype).eval()  # eval: no dropout (the configs have none anyway)


def packed_batch(lengths=(5, 1, 9, 4), vocab=97, seed: int = 1):
    """input_ids, position_ids [1, N], targets [N], upstream grads for logp and entropy [N]."""
    from wz_engine.modeling import next_token_targets

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sum(lengths),), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])
    targets = next_token_targets(ids, pos)
    g_logp = torch.randn(ids.numel(), generator=g)
    g_ent = torch.randn(ids.numel(), generator=g)
    return ids[None], pos[None], targets, g_logp, g_ent


def run(model_wrapper, batch):
    ids, pos, targets, g_logp, g_ent = batch
    logp, ent = model_wrapper(ids, pos, targets, temperature=0.9, return_entropy=True)
    (logp * g_logp + ent * g_ent).sum().backward()
    return logp.detach(), ent.detach()


def main(out_path: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from wz_engine.modeling import FusedHeadCausalLM

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = {}
    for tied in (True, False):
        wrapper = FusedHeadCausalLM(tiny_model(tied), chunk_size=7)
        for layer in wrapper.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(wrapper, mesh=mesh)
        logp, ent = run(wrapper, packed_batch())
        grads = {n: p.grad.full_tensor() for n, p in wrapper.named_parameters()}
        results[tied] = dict(logp=logp, entropy=ent, grads=grads)
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

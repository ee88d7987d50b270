"""One BlockServer in-process (MemoryTransport): LoRA on int8 and bf16 blocks gives what the same blocks give locally.

The PEFT equivalence itself is tested in test_lora_kernels.py (fp32) and over real daemons in test_lora_daemons.py;
here the server path (wire, device/dtype casts, hooks on `Int8Linear`, grads of the client's weights) must add no
error of its own: the server's answer equals `apply_lora` on an identically loaded span, to TOL.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from petal.daemon.net.transport import MemoryNetwork, MemoryTransport, PeerAddr
from petal.daemon.routing.remote import RemoteSpan
from petal.daemon.serving.block_server import BlockServer
from petal.daemon.serving.settings import ServeSettings
from petal.kernels.lora import apply_lora, lora_targets
from petal.kernels.store import load_span, open_model
from petal.protocol.lora import Lora
from tests.support.tinymodels import tiny_llama

TOL = 1e-6
HIDDEN = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(num_hidden_layers=4).save_pretrained(out)
    return out


def make_lora(config) -> Lora:
    g = torch.Generator().manual_seed(0)
    weights = {}
    for i in range(1, 4):
        for path in ("self_attn.q_proj", "mlp.down_proj"):
            fan_in, fan_out = lora_targets(config)[path]
            weights[f"{i}.{path}.lora_A"] = 0.1 * torch.randn(4, fan_in, generator=g)
            weights[f"{i}.{path}.lora_B"] = 0.1 * torch.randn(fan_out, 4, generator=g)
    return Lora(2.0, weights)


@pytest.mark.parametrize(("quant", "dtype"), [("int8", "float32"), ("none", "bfloat16")])
async def test_server_equals_local_blocks(model_dir: Path, quant: str, dtype: str) -> None:
    info = open_model(model_dir)
    torch_dtype = getattr(torch, dtype)
    net = MemoryNetwork()
    server_t, client_t = MemoryTransport(net, "server"), MemoryTransport(net, "client")
    await server_t.start()
    await client_t.start()
    server = BlockServer(
        load_span(info, 0, 4, dtype=torch_dtype, quant=quant),
        model=info.name,
        fingerprint=info.fingerprint,
        family=info.family,
        num_blocks=4,
        transport=server_t,
        settings=ServeSettings(dtype=dtype, quant=quant, max_cache_tokens=64),
        throughput=1.0,
    )
    await server.start()
    try:
        local = load_span(info, 0, 4, dtype=torch_dtype, quant=quant)
        lora = make_lora(local.config)
        remote = RemoteSpan(client_t, PeerAddr("server"), info.name, info.fingerprint, 1, 4, "none")
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 5, HIDDEN, generator=g)
        grad_out = torch.randn(2, 5, HIDDEN, generator=g)

        leaves = Lora(lora.scale, {k: t.clone().requires_grad_(True) for k, t in lora.weights.items()})
        xl = x.to(torch_dtype).requires_grad_(True)
        with apply_lora(leaves, zip(range(1, 4), local.blocks[1:], strict=True)):
            hidden = xl
            prepared = local._runner.prepare(torch.ones(2, 5, dtype=torch.long), 5, torch_dtype)
            for block in local.blocks[1:]:
                hidden = local._runner.run_block(block, hidden, prepared, None)
        want_grads = torch.autograd.grad(hidden, [xl, *leaves.weights.values()], grad_out.to(torch_dtype))

        got = await remote.forward(x, lora=lora)
        assert (got - hidden.float()).abs().max().item() <= TOL
        g_in, g_prompts, g_lora = await remote.backward(x, grad_out, lora=lora)
        assert g_prompts is None and g_lora is not None and list(g_lora) == list(lora.weights)
        assert (g_in - want_grads[0].float()).abs().max().item() <= TOL
        for key, want in zip(leaves.weights, want_grads[1:], strict=True):
            assert g_lora[key].dtype == torch.float32 and (g_lora[key] - want).abs().max().item() <= TOL, key
        # without LoRA the server is the plain blocks again (no hook left behind)
        plain = await remote.forward(x)
        assert (plain - got).abs().max().item() > 1e-3
        assert all(not m._forward_hooks for m in server.span.modules())
    finally:
        await server.stop()
        await client_t.stop()
        await server_t.stop()

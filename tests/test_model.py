import math

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.model import Attention, build_model, count_parameters, patchify, sinusoidal_embedding


def expected_parameters(depth: int, mlp: int, dim: int = 8, patch_dim: int = 16, classes: int = 10) -> int:
    per_block = 2 * 2 * dim + (dim * 3 * dim + 3 * dim) + (dim * mlp + mlp) + (mlp * dim + dim)
    return patch_dim * dim + dim + dim + depth * per_block + 2 * dim + dim * classes + classes


@pytest.mark.parametrize("depth, mlp", [(2, 16), (2, 32), (3, 16), (3, 32)])
def test_shapes_and_parameter_counts(depth, mlp):
    model = build_model(ModelConfig(depth=depth, mlp_hidden=mlp), seed=0)
    logits = model(torch.rand(5, 1, 28, 28))
    assert logits.shape == (5, 10)
    assert count_parameters(model) == expected_parameters(depth, mlp)
    assert model.num_patches == 49


def test_outputs_are_logits_not_probabilities():
    model = build_model(ModelConfig(), seed=0)
    logits = model(torch.rand(8, 1, 28, 28))
    assert not torch.allclose(logits.sum(1), torch.ones(8))
    assert (logits < 0).any()


def test_patchify_equals_naive_loop():
    images = torch.rand(3, 1, 28, 28)
    patches = patchify(images, 4)
    assert patches.shape == (3, 49, 16)
    for b in range(3):
        for i in range(7):
            for j in range(7):
                naive = images[b, 0, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(-1)
                assert torch.equal(patches[b, 7 * i + j], naive)


def test_attention_equals_naive_reference():
    torch.manual_seed(0)
    attn = Attention(dim=8, heads=2).eval()
    x = torch.randn(4, 50, 8)
    got = attn(x)
    wq, wk, wv = attn.qkv.weight.split(8)
    bq, bk, bv = attn.qkv.bias.split(8)
    expected = torch.empty_like(x)
    for b in range(4):
        heads = []
        for h in range(2):
            sl = slice(4 * h, 4 * h + 4)
            q = x[b] @ wq[sl].T + bq[sl]
            k = x[b] @ wk[sl].T + bk[sl]
            v = x[b] @ wv[sl].T + bv[sl]
            weights = torch.softmax(q @ k.T / math.sqrt(4), dim=-1)
            heads.append(weights @ v)
        expected[b] = torch.cat(heads, dim=-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    weights = attn.attention_weights(x)
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, 2, 50))


@pytest.mark.parametrize("base", [10000.0, 100.0])
def test_sinusoidal_embedding_formula(base):
    table = sinusoidal_embedding(50, 8, base)
    for pos in (0, 1, 17, 49):
        for i in range(8):
            angle = pos / base ** ((i - i % 2) / 8)
            assert table[pos, i].item() == pytest.approx(math.sin(angle) if i % 2 == 0 else math.cos(angle), abs=1e-6)


def test_configurable_knobs():
    cfg = ModelConfig(dim=16, heads=4, depth=1, mlp_hidden=24, patch_size=7, pos_embedding="learned", dropout=0.1,
                      attn_out_proj=True)
    model = build_model(cfg, seed=0)
    assert model.num_patches == 16
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert isinstance(model.pos_embed, torch.nn.Parameter)


def test_seeded_build_is_reproducible():
    a = build_model(ModelConfig(), seed=3).state_dict()
    b = build_model(ModelConfig(), seed=3).state_dict()
    c = build_model(ModelConfig(), seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def assert_patch_reaches_nearby_tokens(model, images, corner, size, reach):
    """Raising a size x size square of pixels at ``corner`` (row, col) inside 4x4 patch (i, j) moves token (i, j) of
    the 7x7 grid and no token more than ``reach`` cells away."""
    before = model.tokens(images)
    r, c = corner
    for i, j in [(0, 0), (3, 5), (6, 2)]:
        moved = images.clone()
        moved[0, 0, 4 * i + r:4 * i + r + size, 4 * j + c:4 * j + c + size] += 1.0
        changed = (model.tokens(moved) - before).abs().amax(-1)[0, 1:].view(7, 7) > 1e-6
        assert changed[i, j]
        rows, cols = torch.nonzero(changed, as_tuple=True)
        assert ((rows - i).abs() <= reach).all() and ((cols - j).abs() <= reach).all()


def test_conv_stem_tokens_sit_on_the_patch_grid():
    """model.stem=conv: log2(4) = 2 stride-2 3x3 convolutions (1 -> 32 -> 64 channels) and a 1x1 one to dim give
    the 7x7 grid of 4x4 patches, row-major as patchify orders it: a pixel in patch (i, j) moves token (i, j) and
    leaves every token two or more cells away untouched (the stem's receptive field is 11x11 pixels)."""
    cfg = ModelConfig(dim=16, heads=2, depth=1, mlp_hidden=16, stem="conv")
    model = build_model(cfg, seed=0).eval()
    assert model.num_patches == 49 and not hasattr(model, "patch_embed")
    stem_params = (1 * 32 * 9 + 32) + (32 * 64 * 9 + 64) + (64 * 16 + 16)
    patch_model = build_model(cfg.model_copy(update={"stem": "patch"}), seed=0)
    assert count_parameters(model) - count_parameters(patch_model) == stem_params - (16 * 16 + 16)
    images = torch.rand(1, 1, 28, 28)
    assert_patch_reaches_nearby_tokens(model, images, (1, 2), size=1, reach=1)
    assert model(images).shape == (1, 10)


def test_conv_pool_stem_has_the_conv_stems_weights_and_grid():
    """model.stem=conv-pool: the conv stem's weights, each 3x3 convolution at stride 1 followed by a 3x3 stride-2
    max-pool, giving the same 7x7 token grid: pixels in patch (i, j) move token (i, j) and no token more than two cells
    away (token t of a row sees pixels 4t-6 to 4t+6, a 13x13 receptive field)."""
    cfg = ModelConfig(dim=16, heads=2, depth=1, mlp_hidden=16, stem="conv-pool")
    model = build_model(cfg, seed=0).eval()
    conv = build_model(cfg.model_copy(update={"stem": "conv"}), seed=0)
    assert [p.shape for p in model.parameters()] == [p.shape for p in conv.parameters()]
    layers = [type(m).__name__ for m in model.stem]
    assert layers == ["Conv2d", "GELU", "MaxPool2d", "Conv2d", "GELU", "MaxPool2d", "Conv2d"]
    assert all(m.stride == (1, 1) for m in model.stem if isinstance(m, torch.nn.Conv2d))
    images = torch.rand(1, 1, 28, 28)
    assert model.tokens(images).shape == (1, 50, 16)
    assert_patch_reaches_nearby_tokens(model, images, (1, 1), size=2, reach=2)


@pytest.mark.parametrize("pos_embedding", ["learned", "sinusoidal"])
def test_mean_pool_classifies_the_mean_patch_token_without_a_class_token(pos_embedding):
    """model.pool=mean: no class token (and no position for one); the head reads the mean over the 49 patch tokens of
    the last block's output after the final LayerNorm, so the same weights give the logits computed by hand."""
    cfg = ModelConfig(dim=16, heads=2, depth=2, mlp_hidden=24, pos_embedding=pos_embedding, pool="mean")
    model = build_model(cfg, seed=0).eval()
    cls = build_model(cfg.model_copy(update={"pool": "cls"}), seed=0)
    assert not hasattr(model, "cls_token") and hasattr(cls, "cls_token")
    fewer = 16 + (16 if pos_embedding == "learned" else 0)  # the class token, and its learned position
    assert count_parameters(cls) - count_parameters(model) == fewer
    images = torch.rand(3, 1, 28, 28)
    tokens = model.tokens(images)
    assert tokens.shape == (3, 49, 16)
    x = tokens
    for block in model.blocks:
        x = block(x)
    expected = model.head(torch.stack([model.norm(x[:, t]) for t in range(49)], dim=1).sum(dim=1) / 49)
    torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-6)
    assert [m.shape for m in model.attention_maps(images)] == [(3, 2, 49, 49)] * 2

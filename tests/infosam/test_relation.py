import torch

from infosam.relation import RelationModule


def test_parameter_count_matches_reference():
    assert sum(p.numel() for p in RelationModule(256).parameters()) == 132_608


def test_reference_state_dict_loads_strictly():
    ref = {
        "query_proj.weight": torch.randn(256, 256),
        "query_proj.bias": torch.randn(256),
        "key_proj.weight": torch.randn(256, 256),
        "key_proj.bias": torch.randn(256),
        "layer_norm_feat.weight": torch.randn(256),
        "layer_norm_feat.bias": torch.randn(256),
        "layer_norm_mask.weight": torch.randn(256),
        "layer_norm_mask.bias": torch.randn(256),
    }
    RelationModule(256).load_state_dict(ref, strict=True)


def test_forward_matches_the_formula_and_rows_are_unit_norm():
    torch.manual_seed(0)
    rm = RelationModule(16)
    feat, mask = torch.randn(3, 10, 16), torch.randn(3, 1, 16)
    out = rm(feat, mask)
    f, m = rm.layer_norm_feat(feat), rm.layer_norm_mask(mask)
    a = (rm.query_proj(m) @ rm.key_proj(f).transpose(1, 2)) / 4 + m @ f.transpose(1, 2)
    expected = a.squeeze(1) / a.squeeze(1).norm(dim=1, keepdim=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    # (B, C, H, W) embeddings are accepted and mean the same tokens.
    emb = feat.transpose(1, 2).reshape(3, 16, 2, 5)
    torch.testing.assert_close(rm(emb, mask), out)

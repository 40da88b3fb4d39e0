"""Closed forms and invariances of loralab.analysis (LoRA Eq. 4, Table 7, spectra, Eckart–Young), and how
loralab.analyze pairs runs by identity. All tiny."""

import json
import math

import numpy as np
import pytest
import torch

from loralab.analysis import (
    alignment,
    alignment_table,
    amplification,
    amplification_table,
    best_rank_k,
    delta_bases,
    eckart_young,
    expected_random_phi,
    left_basis,
    phi_grid,
    phi_grids_for_layers,
    random_phi_grid,
    rank_for_energy,
    right_basis,
    spectrum,
    spectrum_table,
    truncated_svd,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def orthonormal(n, k=None, seed=0):
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=torch.float64))
    return Q[:, : (n if k is None else k)]


def phi_loop(U1, U2):
    """Eq. 4 literally: one matrix product per (i, j)."""
    r1, r2 = U1.shape[1], U2.shape[1]
    out = np.empty((r1, r2))
    for i in range(1, r1 + 1):
        for j in range(1, r2 + 1):
            out[i - 1, j - 1] = float(torch.linalg.matrix_norm(U1[:, :i].T @ U2[:, :j]) ** 2) / min(i, j)
    return out


# ---------------------------------------------------------------- subspace similarity (LoRA Eq. 4)


def test_phi_identical_subspaces_is_one():
    U = orthonormal(20, 6)
    np.testing.assert_allclose(phi_grid(U, U), np.ones((6, 6)), atol=1e-12)


def test_phi_orthogonal_subspaces_is_zero():
    Q = orthonormal(20)
    np.testing.assert_allclose(phi_grid(Q[:, :5], Q[:, 5:12]), np.zeros((5, 7)), atol=1e-12)


def test_phi_nested_subspaces_is_one():
    Q = orthonormal(24)
    # U1 = Q[:, :4], U2 = Q[:, :9]: the leading columns coincide, overlap count = min(i, j)
    np.testing.assert_allclose(phi_grid(Q[:, :4], Q[:, :9]), np.ones((4, 9)), atol=1e-12)


def test_phi_permuted_columns_counts_shared_directions():
    Q = orthonormal(16, seed=1)
    r1, r2 = 5, 7
    perm = torch.randperm(16, generator=gen(3))[:r2].tolist()
    got = phi_grid(Q[:, :r1], Q[:, perm])
    want = np.array(
        [[len(set(range(i)) & set(perm[:j])) / min(i, j) for j in range(1, r2 + 1)] for i in range(1, r1 + 1)]
    )
    assert want.max() > 0  # the draw shares some directions, so the case is not trivial
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_phi_grid_matches_double_loop():
    U1 = right_basis(torch.randn(6, 30, generator=gen(1)))
    U2 = right_basis(torch.randn(9, 30, generator=gen(2)))
    got = phi_grid(U1, U2)
    assert got.shape == (6, 9)
    np.testing.assert_allclose(got, phi_loop(U1, U2), rtol=0, atol=1e-12)
    assert got.min() >= 0 and got.max() <= 1 + 1e-12


def test_phi_grid_batched_matches_single():
    U1 = torch.stack([right_basis(torch.randn(4, 12, generator=gen(s))) for s in range(3)])
    U2 = torch.stack([right_basis(torch.randn(5, 12, generator=gen(10 + s))) for s in range(3)])
    got = phi_grid(U1, U2)
    assert got.shape == (3, 4, 5)
    for b in range(3):
        np.testing.assert_allclose(got[b], phi_grid(U1[b], U2[b]), atol=1e-14)


def test_random_phi_mean_matches_max_ij_over_dim():
    dim, r1, r2, draws = 64, 8, 8, 200
    g = gen(123)
    grids = np.stack([random_phi_grid(dim, r1, r2, g) for _ in range(draws)])
    for i, j in [(1, 1), (2, 5), (8, 3), (8, 8)]:
        vals = grids[:, i - 1, j - 1]
        se = vals.std(ddof=1) / math.sqrt(draws)
        assert abs(vals.mean() - expected_random_phi(dim, i, j)) < 3 * se, (i, j, vals.mean(), se)
    np.testing.assert_allclose(expected_random_phi(dim, np.array([1, 4]), 2), [2 / 64, 4 / 64])


def test_phi_invariant_to_sign_flips_and_scaling():
    A1 = torch.randn(5, 40, generator=gen(4), dtype=torch.float64)
    A2 = torch.randn(7, 40, generator=gen(5), dtype=torch.float64)
    base = phi_grid(right_basis(A1), right_basis(A2))
    signs1 = torch.tensor([1.0, -1, -1, 1, -1], dtype=torch.float64)
    signs2 = torch.tensor([-1.0, 1, -1, -1, 1, 1, -1], dtype=torch.float64)
    np.testing.assert_allclose(phi_grid(right_basis(A1) * signs1, right_basis(A2) * signs2), base, atol=1e-12)
    for c1, c2 in [(3.0, 1.0), (-0.25, 7.0), (-2.0, -1e-3)]:
        np.testing.assert_allclose(phi_grid(right_basis(c1 * A1), right_basis(c2 * A2)), base, atol=1e-10)


def test_bases_shapes_and_footnote7_and_delta_bases():
    r, d_in, d_out = 4, 20, 15
    A = torch.randn(r, d_in, generator=gen(6), dtype=torch.float64)
    B = torch.randn(d_out, r, generator=gen(7), dtype=torch.float64)
    assert right_basis(A).shape == (d_in, r) and right_basis(A, 2).shape == (d_in, 2)
    assert left_basis(B).shape == (d_out, r) and left_basis(B, 3).shape == (d_out, 3)
    torch.testing.assert_close(right_basis(A).T @ right_basis(A), torch.eye(r, dtype=torch.float64))
    # ΔW = B·A with full-rank factors: its top-r singular subspaces are span(Aᵀ) and span(B)
    U, V = delta_bases(B @ A, r)
    assert U.shape == (d_out, r) and V.shape == (d_in, r)
    np.testing.assert_allclose(phi_grid(V, right_basis(A))[-1, -1], 1.0, atol=1e-12)
    np.testing.assert_allclose(phi_grid(U, left_basis(B))[-1, -1], 1.0, atol=1e-12)
    # conv factor (r, in, kh, kw) is flattened to r x (in·kh·kw)
    assert right_basis(torch.randn(r, 3, 2, 2, generator=gen(8))).shape == (12, r)


def test_phi_grids_for_layers_common_names():
    b1 = {"q": orthonormal(10, 3), "v": orthonormal(10, 2), "only1": orthonormal(10, 2)}
    b2 = {"v": orthonormal(10, 4, seed=2), "q": orthonormal(10, 3), "only2": orthonormal(10, 1)}
    grids = phi_grids_for_layers(b1, b2)
    assert list(grids) == ["q", "v"]
    assert grids["v"].shape == (2, 4)
    np.testing.assert_allclose(grids["q"], np.ones((3, 3)), atol=1e-12)


# ---------------------------------------------------------------- W vs ΔW (LoRA §7.3, Table 7)


def _w(out=12, d_in=9, s=(9.0, 7.0, 5.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1)):
    P, R = orthonormal(out, seed=10), orthonormal(d_in, seed=11)
    s = torch.tensor(s, dtype=torch.float64)
    return P[:, : len(s)] @ torch.diag(s) @ R[:, : len(s)].T, P, R, s


def test_amplification_aligned_with_kth_singular_pair():
    W, P, R, s = _w()
    c, k = 4.0, 2  # ΔW along W's 3rd singular pair
    dW = c * torch.outer(P[:, k], R[:, k])
    out = amplification(W, dW, r=1)
    assert out["proj_dW"] == pytest.approx(float(s[k]), rel=1e-12)
    assert out["factor"] == pytest.approx(c / float(s[k]), rel=1e-12)
    assert out["norm_dW"] == pytest.approx(c, rel=1e-12)
    assert out["norm_W"] == pytest.approx(float(s.norm()), rel=1e-12)
    # two pairs, r = 2: projection on both
    dW2 = 3.0 * torch.outer(P[:, 1], R[:, 1]) + 1.0 * torch.outer(P[:, 4], R[:, 4])
    out2 = amplification(W, dW2, r=2)
    assert out2["proj_dW"] == pytest.approx(math.hypot(s[1], s[4]), rel=1e-12)
    assert out2["factor"] == pytest.approx(math.sqrt(10.0) / math.hypot(s[1], s[4]), rel=1e-12)


def test_amplification_orthogonal_update_gives_inf():
    W, P, R, s = _w(s=(5.0, 4.0, 3.0))  # rank 3: columns 3.. of P, R are outside W's spaces
    dW = 2.0 * torch.outer(P[:, 5], R[:, 4])
    out = amplification(W, dW, r=1)
    assert out["proj_dW"] < 1e-13
    assert out["factor"] == math.inf
    assert math.isnan(amplification(W, torch.zeros_like(W), r=1)["factor"])


def test_amplification_proj_W_is_top_r_energy_and_random_is_small():
    W = torch.randn(30, 20, generator=gen(12), dtype=torch.float64)
    s = torch.linalg.svdvals(W)
    for r in (1, 3, 20, 50):
        out = amplification(W, torch.randn(30, 20, generator=gen(13), dtype=torch.float64), r)
        assert out["r"] == min(r, 20)
        assert out["proj_W"] == pytest.approx(float(s[: out["r"]].norm()), rel=1e-12)
        assert out["proj_random"] <= out["proj_W"] * (1 + 1e-12)


def test_amplification_invariant_under_orthogonal_change_of_basis():
    W = torch.randn(10, 8, generator=gen(14), dtype=torch.float64)
    dW = torch.randn(10, 8, generator=gen(15), dtype=torch.float64)  # generic: distinct singular values
    P, R = orthonormal(10, seed=16), orthonormal(8, seed=17)
    a, b = amplification(W, dW, 3), amplification(P @ W @ R, P @ dW @ R, 3)
    for key in ("proj_dW", "proj_W", "norm_W", "norm_dW", "factor"):  # proj_random: a fixed draw, not covariant
        assert abs(a[key] - b[key]) < 1e-10 * max(1.0, abs(a[key])), key


def test_amplification_conv_and_table():
    W = torch.randn(6, 3, 2, 2, generator=gen(18))
    dW = torch.randn(6, 3, 2, 2, generator=gen(19))
    out = amplification(W, dW, 2)
    assert out["norm_W"] == pytest.approx(float(W.double().norm()), rel=1e-12)
    table = amplification_table({"a": W, "b": W[:, :, 0, 0], "c": W}, {"a": dW, "b": dW[:, :, 0, 0]}, r=2)
    assert list(table["name"]) == ["a", "b"]
    assert list(table.columns) == [
        "name",
        "r",
        "proj_dW",
        "proj_W",
        "proj_W_tol",
        "proj_random",
        "norm_W",
        "norm_dW",
        "factor",
    ]
    assert table.loc[0, "proj_dW"] == pytest.approx(out["proj_dW"], rel=1e-12)


# ---------------------------------------------------------------- spectrum


def test_spectrum_rank_k_and_stable_rank():
    M = torch.randn(20, 3, generator=gen(20), dtype=torch.float64) @ torch.randn(3, 15, generator=gen(21)).double()
    out = spectrum(M)
    assert out["numerical_rank"] == 3
    assert len(out["singular_values"]) == 15
    assert out["stable_rank"] == pytest.approx(out["fro_norm"] ** 2 / out["sigma_max"] ** 2)
    Q = orthonormal(12, seed=22)
    assert spectrum(Q)["stable_rank"] == pytest.approx(12.0, rel=1e-12)
    assert spectrum(Q)["numerical_rank"] == 12
    # float32 storage: rounding noise of a rank-3 product stays below the float32 tolerance
    assert spectrum(M.float())["numerical_rank"] == 3
    z = spectrum(torch.zeros(4, 5))
    assert z["numerical_rank"] == 0 and z["rank_energy"] == 0 and z["stable_rank"] == 0.0


def test_rank_for_energy():
    assert rank_for_energy([3.0, 2.0, 1.0], 0.9) == 2  # 9 + 4 = 13 ≥ 0.9 · 14 = 12.6 > 9
    assert rank_for_energy([1.0, 2.0, 3.0], 0.9) == 2  # order does not matter
    assert rank_for_energy([3.0, 2.0, 1.0], 0.5) == 1
    assert rank_for_energy([3.0, 2.0, 1.0], 1.0) == 3
    assert rank_for_energy(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.75) == 3
    with pytest.raises(ValueError):
        rank_for_energy([1.0], 0.0)


def test_spectrum_table_batched_matches_single():
    deltas = {
        "a": torch.randn(8, 6, generator=gen(23)),
        "b": torch.randn(5, 7, generator=gen(24), dtype=torch.float64),
        "c": torch.randn(8, 6, generator=gen(25)),
        "d": torch.randn(4, 2, 1, 3, generator=gen(26)),
    }
    table = spectrum_table(deltas, chunk=1, keep_singular_values=True)
    assert list(table["name"]) == list(deltas)
    stacked = spectrum_table(deltas, keep_singular_values=True)  # "a" and "c" share one batched svdvals
    np.testing.assert_allclose(np.stack(stacked["singular_values"][[0, 2]]), np.stack(table["singular_values"][[0, 2]]))
    for _, row in table.iterrows():
        single = spectrum(deltas[row["name"]])
        np.testing.assert_allclose(row["singular_values"], single["singular_values"], rtol=1e-12)
        for key in ("stable_rank", "rank_energy", "numerical_rank", "fro_norm"):
            assert row[key] == pytest.approx(single[key], rel=1e-12)


# ---------------------------------------------------------------- first-step alignment (LoRA-GA)


def _g(sigma=(5.0, 3.0, 2.0, 1.0, 0.5)):
    sigma = torch.tensor(sigma, dtype=torch.float64)
    n = len(sigma)
    return orthonormal(9, n, seed=30) @ torch.diag(sigma) @ orthonormal(7, n, seed=31).T, sigma


def test_eckart_young_closed_form_and_attained():
    G, sigma = _g()
    s2 = sigma**2
    for k in range(0, 6):
        want = float(s2[k:].sum() / s2.sum())
        assert eckart_young(G, k) == pytest.approx(want, abs=1e-12)
        Gk = best_rank_k(G, k)
        assert Gk.shape == G.shape
        assert abs(alignment(Gk, G)["rel_error"] - eckart_young(G, k)) < 1e-12
    U, S, Vh = truncated_svd(G, 2)
    assert U.shape == (9, 2) and Vh.shape == (2, 7)
    np.testing.assert_allclose(S.numpy(), sigma[:2].numpy(), rtol=1e-12)
    # no other rank-2 matrix does better, e.g. a random one rescaled optimally
    u = torch.randn(9, 2, generator=gen(32), dtype=torch.float64) @ torch.randn(2, 7, generator=gen(33)).double()
    u = u * (u * G).sum() / (u * u).sum()
    assert alignment(u, G)["rel_error"] >= eckart_young(G, 2)


def test_alignment_cosine_and_rel_error():
    G, _ = _g()
    a = alignment(G, G)
    assert a["cosine"] == pytest.approx(1.0, abs=1e-12) and a["rel_error"] == pytest.approx(0.0, abs=1e-12)
    b = alignment(-G, G)
    assert b["cosine"] == pytest.approx(-1.0, abs=1e-12) and b["rel_error"] == pytest.approx(4.0, rel=1e-12)
    c = alignment(2 * G, G)  # raw: no rescaling of the update
    assert c["cosine"] == pytest.approx(1.0, abs=1e-12) and c["rel_error"] == pytest.approx(1.0, rel=1e-12)
    assert math.isnan(alignment(torch.zeros_like(G), G)["cosine"])
    with pytest.raises(ValueError):
        alignment(G, G.T)
    table = alignment_table({"x": G, "y": -G}, {"x": G, "y": G}, k=2)
    assert list(table.columns) == ["name", "cosine", "rel_error", "eckart_young"]
    assert table.loc[1, "cosine"] == pytest.approx(-1.0)


# ---------------------------------------------------------------- cross-run pairs (loralab.analyze)


def test_cross_run_pairs_are_formed_by_identity(compose_cfg, tmp_path, capsys):
    """Runs pair when they share everything but rank (or seed): the same identity key. The φ JSON names both runs;
    a run without saved bases is skipped with a message."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from loralab.analyze import analyze_runs
    from loralab.io import write_json_atomic
    from loralab.record import RESULT_FILE, RunRecord, Status, identity_of
    from loralab.results import BASES_FILE, load_runs

    root = tmp_path / "results"
    Q = orthonormal(16, seed=40).float()

    def add(*overrides, bases=None):
        cfg = compose_cfg("model=tiny_bert", *overrides)
        identity = identity_of(cfg)
        run_dir = identity.relative_dir().as_posix()
        artifacts = {}
        (root / run_dir).mkdir(parents=True)
        if bases is not None:
            save_file({"layer.query|A_right": bases.contiguous()}, str(root / run_dir / BASES_FILE))
            artifacts["bases"] = f"{run_dir}/{BASES_FILE}"
        record = RunRecord(
            identity=identity,
            run_dir=run_dir,
            config=OmegaConf.to_container(cfg, resolve=True),
            status=Status.COMPLETED,
            artifacts=artifacts,
        )
        write_json_atomic(root / run_dir / RESULT_FILE, record.to_dict())
        return record

    a = add("rank=2", bases=Q[:, :2])
    b = add("rank=4", bases=Q[:, :4])  # nested: its first two directions are a's
    add("rank=4", "train.lr=2e-3", bases=Q[:, 4:8])  # another learning rate: another group, no partner
    no_bases = add("rank=8")
    frame = load_runs(root, status="completed")
    assert len(frame) == 4 and frame.key.nunique() == 2

    (path,) = analyze_runs(root, frame, rank_pairs=[(2, 4), (2, 8)], seed_pairs=[])
    assert f"skip rank pair {a.run_dir} / {no_bases.run_dir}: no saved bases" in capsys.readouterr().out
    assert path.parent == root / "default" / "analysis" and a.identity.key in path.name
    result = json.loads(path.read_text())
    assert (result["kind"], result["key"], result["targets"]) == ("rank", a.identity.key, "qv")
    assert (result["a"]["run_dir"], result["b"]["run_dir"]) == (a.run_dir, b.run_dir)
    assert (result["a"]["rank"], result["b"]["rank"]) == (2, 4)
    np.testing.assert_allclose(result["layers"]["layer.query"]["A_right"]["phi"], np.ones((2, 4)), atol=1e-4)

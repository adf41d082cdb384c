import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.distill import losses, targets


def np_entropy(logits):
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0).sum(-1)


def np_solve_k(z, h_target):
    """Plain bisection in log k, float64: the reference for the Newton solver."""
    lo, hi = np.log(targets.K_MIN), np.log(targets.K_MAX)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np_entropy(z / np.exp(mid)) > h_target:
            hi = mid
        else:
            lo = mid
    return np.exp(0.5 * (lo + hi))


def random_logits(shape, scale, seed):
    return np.random.default_rng(seed).normal(size=shape) * scale


@pytest.mark.parametrize("scale", [0.3, 2.0, 8.0])
def test_entropy_matched_blend_matches_numpy_and_the_student_entropy(scale):
    teacher = random_logits((4, 6, 200), scale, 0)
    student = random_logits((4, 6, 200), scale, 1)
    target, k = targets.blend_logits(jnp.asarray(teacher), jnp.asarray(student), return_temperature=True)
    np.testing.assert_allclose(np.asarray(targets.entropy(target)), np_entropy(student), atol=1e-3)
    z = 0.75 * teacher + student
    for idx in np.ndindex(4, 6):
        k_ref = np_solve_k(z[idx], np_entropy(student[idx]))
        np.testing.assert_allclose(float(k[idx]), k_ref, rtol=2e-3)
        np.testing.assert_allclose(np.asarray(target[idx]), z[idx] / k_ref, rtol=2e-3, atol=1e-3)


def test_fixed_temperature_and_identical_teacher():
    student = random_logits((3, 50), 2.0, 2)
    fixed = targets.blend_logits(jnp.asarray(student), jnp.asarray(student), 0.75, temperature=2.0)
    np.testing.assert_allclose(np.asarray(fixed), 1.75 * student / 2.0, rtol=1e-5)
    # teacher == student: the entropy-matched blend gives back the student (k = 1 + w)
    matched, k = targets.blend_logits(jnp.asarray(student), jnp.asarray(student), return_temperature=True)
    np.testing.assert_allclose(np.asarray(k), 1.75, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(matched), student, rtol=1e-4, atol=1e-4)


def test_near_deterministic_rows_and_minus_inf_entries():
    student = np.zeros((3, 8))
    student[0, 0] = 200.0  # exp(-200) underflows: the student's entropy is exactly 0
    student[1, 5:] = -np.inf  # a masked vocabulary tail: entropy log 5
    student[2] = 1.0  # uniform over 8, but the teacher masks 5 entries: only log 3 is reachable
    teacher = np.array([[0.0, 3, 0, 0, 0, 0, 0, 0],
                        [0.5, 1, 2, 0, 0, -np.inf, -np.inf, -np.inf],
                        [0.0, 0, 0, -np.inf, -np.inf, -np.inf, -np.inf, -np.inf]])
    target, k = targets.blend_logits(jnp.asarray(teacher), jnp.asarray(student), return_temperature=True)
    target, k = np.asarray(target), np.asarray(k)
    assert np.isfinite(k).all() and (k >= targets.K_MIN).all() and (k <= targets.K_MAX).all()
    assert target[0].argmax() == 0 and np_entropy(target[0]) < 1e-3
    assert np.isneginf(target[1, 5:]).all() and np.isfinite(target[1, :5]).all()
    assert np_entropy(target[1]) == pytest.approx(np.log(5), abs=1e-3)
    assert k[2] == pytest.approx(targets.K_MAX, rel=1e-3)  # as much entropy as the blend allows
    assert np_entropy(target[2]) == pytest.approx(np.log(3), abs=1e-3)


def test_blend_is_a_constant_for_gradients():
    t, s = jnp.ones((2, 5)), jnp.arange(10.0).reshape(2, 5)
    grads = jax.grad(lambda a, b: targets.blend_logits(a, b).sum(), argnums=(0, 1))(t, s)
    assert all(float(jnp.abs(g).sum()) == 0 for g in grads)


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_kl(logp, logq):
    return (np.exp(logp) * (logp - logq)).sum(-1)


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1),
                                       ("jsd", 0.0), ("jsd", 1.0)])
def test_token_losses_match_numpy(kind, beta):
    s, t = random_logits((3, 40), 2.0, 3), random_logits((3, 40), 2.0, 4)
    ls, lt = np_log_softmax(s), np_log_softmax(t)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        expected = np_kl(lt, ls)
    elif kind == "reverse_kl" or beta == 1:
        expected = np_kl(ls, lt)
    else:
        m = np.log(beta * np.exp(lt) + (1 - beta) * np.exp(ls))
        expected = beta * np_kl(lt, m) + (1 - beta) * np_kl(ls, m)
    got = losses.token_losses(jnp.asarray(s), jnp.asarray(t), losses.LossConfig(kind=kind, jsd_beta=beta))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_top_k_truncation_and_clipping():
    s, t = random_logits((2, 30), 2.0, 5), random_logits((2, 30), 2.0, 6)
    got = np.asarray(losses.token_losses(jnp.asarray(s), jnp.asarray(t), losses.LossConfig(top_k=5)))
    for row in range(2):
        keep = np.argsort(-t[row])[:5]
        lt = np_log_softmax(t[row][keep])
        np.testing.assert_allclose(got[row], (np.exp(lt) * (lt - np_log_softmax(s[row])[keep])).sum(), rtol=1e-5)
    full = np.asarray(losses.token_losses(jnp.asarray(s), jnp.asarray(t), losses.LossConfig()))
    cap = float(np.median(full))  # one row above the cap, one below
    clipped = losses.token_losses(jnp.asarray(s), jnp.asarray(t), losses.LossConfig(clip=cap))
    np.testing.assert_allclose(np.asarray(clipped), np.minimum(full, cap), rtol=1e-6)
    # the chunked loss reports which tokens the cap reached (identity projection: hidden = logits)
    per_token = losses.chunked_distill_loss(lambda h: h, jnp.asarray(s)[None], jnp.asarray(t)[None],
                                            jnp.zeros((1, 2), jnp.int32), losses.TargetConfig(kind="teacher"),
                                            losses.LossConfig(clip=cap))
    np.testing.assert_array_equal(np.asarray(per_token["clipped"][0]), (full >= cap).astype(np.float32))


def _chunked(student_h, teacher_h, mask, w, chunk, kind="forward_kl"):
    labels = jnp.arange(student_h.shape[0] * student_h.shape[1]).reshape(student_h.shape[:2]) % w.shape[1]
    per_token = losses.chunked_distill_loss(lambda h: h @ w, student_h, teacher_h, labels, losses.TargetConfig(),
                                            losses.LossConfig(kind=kind, chunk=chunk))
    return jnp.sum(jnp.where(mask, per_token["loss"], 0.0)), per_token


def test_chunking_does_not_change_loss_or_gradients_and_mask_is_respected():
    rng = np.random.default_rng(7)
    h_s, h_t = jnp.asarray(rng.normal(size=(2, 13, 8))), jnp.asarray(rng.normal(size=(2, 13, 8)))
    w = jnp.asarray(rng.normal(size=(8, 32)))
    mask = jnp.asarray(rng.random((2, 13)) > 0.4)
    whole, _ = _chunked(h_s, h_t, mask, w, 13)
    for chunk in (1, 4, 5):
        part, _ = _chunked(h_s, h_t, mask, w, chunk)
        np.testing.assert_allclose(float(part), float(whole), rtol=1e-5)
    # reference: full logits at once
    target = targets.blend_logits(h_t @ w, h_s @ w)
    ref = jnp.sum(jnp.where(mask, losses.token_losses(h_s @ w, target, losses.LossConfig()), 0.0))
    np.testing.assert_allclose(float(whole), float(ref), rtol=1e-5)
    # masked positions change neither the loss nor the gradients
    g = jax.grad(lambda h: _chunked(h, h_t, mask, w, 4)[0])(h_s)
    scrambled = jnp.where(mask[..., None], h_s, 100.0 * jnp.asarray(rng.normal(size=h_s.shape)))
    np.testing.assert_allclose(float(_chunked(scrambled, h_t, mask, w, 4)[0]), float(whole), rtol=1e-5)
    g2 = jax.grad(lambda h: _chunked(h, h_t, mask, w, 4)[0])(scrambled)
    np.testing.assert_allclose(np.asarray(g2), np.asarray(g), atol=1e-6)
    assert float(jnp.abs(jnp.where(mask[..., None], 0.0, g)).max()) == 0.0


def test_sampled_reverse_kl_has_reverse_kl_gradient_in_expectation():
    """Averaged over tokens drawn from the student, -A * grad log p_s(y) is grad KL(student || target)."""
    s, t = jnp.asarray(random_logits((40,), 2.0, 11)), jnp.asarray(random_logits((40,), 2.0, 12))
    config = losses.LossConfig(kind="sampled_reverse_kl")
    p_s = jax.nn.softmax(s)
    per_label = jax.vmap(lambda y: jax.grad(lambda z: losses.token_losses(z, t, config, y))(s))(jnp.arange(40))
    expected = jax.grad(lambda z: losses.token_losses(z, t, losses.LossConfig(kind="reverse_kl")))(s)
    np.testing.assert_allclose(np.asarray(p_s @ per_label), np.asarray(expected), atol=1e-6)
    # the value: -A log p_s(y) with A = log p_t(y) - log p_s(y), and |A| capped by clip
    ls, lt = np_log_softmax(np.asarray(s)), np_log_softmax(np.asarray(t))
    got = float(losses.token_losses(s, t, config, jnp.asarray(3)))
    assert got == pytest.approx(-(lt[3] - ls[3]) * ls[3], rel=1e-5)
    capped = float(losses.token_losses(s, t, losses.LossConfig(kind="sampled_reverse_kl", clip=0.01), jnp.asarray(3)))
    assert capped == pytest.approx(-np.clip(lt[3] - ls[3], -0.01, 0.01) * ls[3], rel=1e-5)


def test_sampled_reverse_kl_refuses_top_k():
    with pytest.raises(ValueError, match="top_k"):
        losses.LossConfig(kind="sampled_reverse_kl", top_k=20)


def test_loss_weights_reweight_end_positions_and_normalise_per_sample():
    from jaxdistill.distill import step as step_lib

    b = step_lib.build_batch([[5, 6], [7]], [[5, 6, 9], [7, 9]], [[20, 21, 2], [22, 23, 24, 25, 26]], pad_id=0,
                             multiple=4, end_ids=(2,))
    assert b["end_mask"].tolist() == [[False, False, True, False, False, False, False, False], [False] * 8]
    token = np.asarray(step_lib.loss_weights(b, losses.LossConfig()))
    np.testing.assert_allclose(token[b["target_mask"]], 1 / 8)
    no_end = np.asarray(step_lib.loss_weights(b, losses.LossConfig(end_weight=0.0)))
    assert no_end[0, 2] == 0 and no_end[b["target_mask"]].sum() == pytest.approx(1.0)
    sequence = np.asarray(step_lib.loss_weights(b, losses.LossConfig(normalize="sequence")))
    np.testing.assert_allclose(sequence.sum(axis=1), [0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(sequence[1, :5], 0.1, rtol=1e-6)

"""The router: rewards by hand, GAE against NumPy, PPO on a known optimum, baselines against an
independent NumPy rollout, precompute resume on a real model, and the route command end to end."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import read_board

from jaxdistill.data.qa import Question
from jaxdistill.errors import RunError
from jaxdistill.rl import ppo
from jaxdistill.router import baselines
from jaxdistill.router import env as env_lib
from jaxdistill.router.experts import Encoder, ExpertConfig, ExpertPool
from jaxdistill.router.precompute import Table, child, num_nodes, path_of, precompute


def make_table(quality, flops, n, t_max, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    q_count, nodes = quality.shape
    assert nodes == num_nodes(n, t_max)
    return Table(quality=quality.astype(np.float32), flops=flops.astype(np.float64),
                 question_emb=rng.normal(size=(q_count, dim)).astype(np.float32),
                 answer_emb=rng.normal(size=(q_count, nodes, dim)).astype(np.float32),
                 answers=[[""] * nodes for _ in range(q_count)], uids=[str(i) for i in range(q_count)],
                 families=[""] * q_count, expert_names=[f"e{i}" for i in range(n)], t_max=t_max)


def plain_env(table):
    return env_lib.make_env(table, 1.0, env_lib.feature_stats(table))


def plan(*actions):
    actions = list(actions)
    return lambda obs, state, key: jnp.asarray(actions + [2] * 4)[state.t]


def test_rewards_match_hand_computed_episodes():
    # two experts, T_max 2; expert 0 costs 1, expert 1 costs 3 (cost_scale 1)
    quality = np.array([[0.0, 0.3, 0.95, 0.5, 0.95, 0.1, 0.2]])
    flops = np.array([[0.0, 1, 3, 1, 3, 1, 3]])
    env = plain_env(make_table(quality, flops, n=2, t_max=2))
    r = env_lib.Rewards(alpha=0.1, beta=0.5, gamma=1.0, p0=0.9)
    run = lambda policy: env_lib.episode(env, r, 0, policy, jax.random.key(0))  # noqa: E731
    cases = {
        # t=0: 0.3 - 0.1*1 = 0.2; t=1 (last, 0.5 < p0): 0.5 + 0.5*(0.5-0.3) - 0.1 - 1 = -0.5
        (0, 0): (-0.3, 0.5, 2, 2.0),
        # t=1 (last) reaches p0: 0.95 + 0.5*0.65 - 0.3 + 1 = 1.975
        (0, 1): (2.175, 0.95, 2, 4.0),
        # reaching p0 does not end the episode (that would need the reference): STOP delivers it, +gamma
        (1,): (0.95 - 0.3 + 1.0, 0.95, 1, 3.0),
        # ... and a second call can spoil it: 0.65; then 0.2 + 0.5*(0.2-0.95) - 0.3 - 1 = -1.475
        (1, 1): (0.65 - 1.475, 0.2, 2, 6.0),
        (2,): (0.0, 0.0, 0, 0.0),  # STOP before any call: no answer, no reward, no penalty
        (0, 2): (0.2, 0.3, 1, 1.0),  # STOP below p0 before T_max: no -gamma (only T_max costs it)
    }
    for actions, (ret, quality_end, calls, spent) in cases.items():
        out = run(plan(*actions))
        np.testing.assert_allclose([out["return"], out["quality"], out["calls"], out["flops"]],
                                   [ret, quality_end, calls, spent], atol=1e-5, err_msg=str(actions))


def _numpy_episode(quality, flops, q, actions, n, t_max, r: env_lib.Rewards):
    """An independent reference of the environment's reward rules."""
    node, total, spent, calls = 0, 0.0, 0.0, 0
    for t, a in enumerate(actions):
        if a == n:
            return total + (r.gamma if quality[q, node] >= r.p0 else 0.0), quality[q, node], calls, spent
        new = node * n + 1 + a
        total += quality[q, new] - r.alpha * flops[q, new] + (r.beta * (quality[q, new] - quality[q, node]) if t else 0)
        node, spent, calls = new, spent + flops[q, new], calls + 1
        if t == t_max - 1:
            return total + (r.gamma if quality[q, node] >= r.p0 else -r.gamma), quality[q, node], calls, spent
    raise AssertionError("a plan must STOP or reach T_max")


def test_plan_outcomes_and_baselines_agree_with_a_numpy_rollout():
    rng = np.random.default_rng(1)
    n, t_max, q_count = 3, 2, 5
    quality = rng.uniform(size=(q_count, num_nodes(n, t_max)))
    quality[:, 0] = 0
    flops = rng.uniform(0.5, 2.0, size=quality.shape)
    flops[:, 0] = 0
    table = make_table(quality, flops, n, t_max)
    env = plain_env(table)
    r = env_lib.Rewards(alpha=0.2, beta=0.5, gamma=0.5, p0=0.8)
    outcomes = baselines.plan_outcomes(env, r)
    plans = baselines.all_plans(n, t_max)
    for q in range(q_count):
        for m, p in enumerate(plans):
            ref = _numpy_episode(quality, flops, q, list(p), n, t_max, r)
            got = [outcomes[k][q, m] for k in ("return", "quality", "calls", "flops")]
            np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=f"question {q}, plan {p}")
    rr = env_lib.evaluate(env, r, baselines.round_robin([2, 0], n, 2), jax.random.key(0))
    for q in range(q_count):
        ref = _numpy_episode(quality, flops, q, [2, 0], n, t_max, r)
        np.testing.assert_allclose([rr["return"][q], rr["quality"][q]], ref[:2], atol=1e-5)
    # the oracle's plan maximises quality - price * cost over every plan; no policy does better
    price = 0.3
    score = lambda out: out["quality"] - price * out["cost"]  # noqa: E731
    oracle = env_lib.evaluate(env, r, baselines.plan_policy(plans, baselines.oracle_choice(outcomes, price)),
                              jax.random.key(0))
    np.testing.assert_allclose(score(oracle), score(outcomes).max(axis=1), atol=1e-6)
    rand = env_lib.evaluate(env, r, baselines.random_policy(n), jax.random.key(3))
    assert np.all(score(rand) <= score(oracle) + 1e-6)


def test_random_baseline_stops_to_match_a_mean_number_of_calls():
    assert baselines.stop_probability_for(1.0, 2) == pytest.approx(1 - (5**0.5 - 1) / 2)  # (1-p) + (1-p)^2 = 1
    assert baselines.stop_probability_for(0.0, 3) == pytest.approx(1.0)
    assert baselines.stop_probability_for(3.0, 3) == pytest.approx(0.0, abs=1e-9)
    n, t_max, q_count = 3, 3, 4000
    quality = np.zeros((q_count, num_nodes(n, t_max)))
    env = plain_env(make_table(quality, np.ones_like(quality), n, t_max))
    p = baselines.stop_probability_for(1.7, t_max)
    calls = env_lib.evaluate(env, env_lib.Rewards(), baselines.random_policy(n, p), jax.random.key(0))["calls"]
    assert calls.mean() == pytest.approx(1.7, abs=0.05)


def test_actions_never_depend_on_test_references():
    """Evaluation with garbage test references: every method but the oracle takes the same actions;
    only the reported quality changes."""
    from ml_collections import ConfigDict

    from jaxdistill.router.evaluate import evaluate_all

    rng = np.random.default_rng(0)
    n, t_max = 3, 2
    nodes = num_nodes(n, t_max)
    tables = []
    for q_count, seed in ((40, 1), (24, 2)):
        quality = rng.uniform(size=(q_count, nodes)) ** 0.5
        quality[:, 0] = 0
        flops = np.concatenate([np.zeros((q_count, 1)), rng.uniform(1, 3, size=(q_count, nodes - 1))], axis=1)
        tables.append(make_table(quality, flops, n, t_max, seed=seed))
    train_table, test_table = tables
    garbage = dataclasses.replace(test_table, quality=rng.uniform(size=test_table.quality.shape).astype(np.float32))
    stats = env_lib.feature_stats(train_table)
    train_env = env_lib.make_env(train_table, 1.0, stats)
    r = env_lib.Rewards(alpha=0.1, beta=0.5, gamma=0.5, p0=0.8)
    config = ppo.PPOConfig(num_envs=16, num_steps=8, total_timesteps=16 * 8 * 20, hidden=(16,))
    alphas = np.array([0.0, 0.2], np.float32)
    keys = jax.random.split(jax.random.key(0), 2)
    states, _ = ppo.train_grid(ppo.make_train(config, train_env, r, env_lib), train_env, keys, jnp.asarray(alphas))
    params = states.params
    graphdef = ppo.policy_graph(train_env, config)
    evaluations = [evaluate_all(ConfigDict(dict(seed=0, knn_k=3)), train_env, env_lib.make_env(test, 1.0, stats),
                                train_table, test, r, alphas, graphdef, params, 2) for test in (test_table, garbage)]
    for honest, fooled in zip(*evaluations, strict=True):
        assert set(honest) == set(fooled) and "router (PPO)" in honest
        for method in honest:
            for a, b in zip(honest[method], fooled[method], strict=True):
                if method.startswith("oracle"):
                    continue  # the upper bound reads the labels by design
                np.testing.assert_array_equal(a["node"], b["node"], err_msg=method)
                np.testing.assert_array_equal(a["calls"], b["calls"], err_msg=method)
        router = honest["router (PPO)"][0]
        assert not np.allclose(router["quality"], fooled["router (PPO)"][0]["quality"])


def test_without_transfer_each_call_answers_alone():
    n, t_max = 2, 2
    quality = np.arange(num_nodes(n, t_max), dtype=np.float32)[None] / 10
    flops = np.arange(num_nodes(n, t_max), dtype=np.float64)[None]
    table = make_table(quality, flops, n, t_max)
    plain = table.without_transfer()
    for node in range(1, num_nodes(n, t_max)):
        first = child(0, path_of(node, n)[-1], n)  # the last expert's answer to the bare question
        assert plain.quality[0, node] == table.quality[0, first] and plain.flops[0, node] == table.flops[0, first]
        np.testing.assert_array_equal(plain.answer_emb[0, node], table.answer_emb[0, first])
    assert plain.quality[0, 0] == 0


def test_knn_router_copies_the_neighbours_best_plan():
    train_emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    outcomes = {"quality": np.array([[0.0, 1.0, 0.9], [0.0, 0.8, 0.7], [0.0, 0.1, 0.9]]),
                "cost": np.array([[0.0, 2.0, 1.0]] * 3)}
    test_emb = np.array([[1.0, 0.05], [0.1, 1.0]])
    np.testing.assert_array_equal(baselines.knn_choice(train_emb, outcomes, test_emb, k=1, price=0.0), [1, 2])
    # at a price, the cheaper plan wins when its quality is close enough
    np.testing.assert_array_equal(baselines.knn_choice(train_emb, outcomes, test_emb, k=1, price=0.2), [2, 2])
    np.testing.assert_array_equal(baselines.knn_choice(train_emb, outcomes, test_emb, k=2, price=0.0), [1, 2])
    with pytest.raises(ValueError, match="knn_k must be in"):
        baselines.knn_choice(train_emb, outcomes, train_emb, k=4, price=0.0)


def test_gae_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    steps, envs, discount, lam = 7, 3, 0.9, 0.8
    rewards, values = rng.normal(size=(steps, envs)), rng.normal(size=(steps, envs))
    dones = rng.uniform(size=(steps, envs)) < 0.3
    last = rng.normal(size=envs)
    expected = np.zeros((steps, envs))
    running, next_value = np.zeros(envs), last
    for t in reversed(range(steps)):
        live = 1.0 - dones[t]
        delta = rewards[t] + discount * next_value * live - values[t]
        running = delta + discount * lam * live * running
        expected[t], next_value = running, values[t]
    advantage, target = ppo.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(dones), jnp.asarray(last),
                                discount, lam)
    np.testing.assert_allclose(advantage, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(target, expected + values, rtol=1e-5, atol=1e-5)


def test_ppo_finds_the_known_optimal_policy():
    # expert 1 is always right and cheap; expert 0 is cheap and wrong; expert 2 half right and dear.
    n, t_max, q_count = 3, 3, 16
    nodes = num_nodes(n, t_max)
    last_expert = np.array([(m - 1) % n for m in range(nodes)])
    quality = np.tile(np.where(last_expert == 1, 1.0, np.where(last_expert == 0, 0.1, 0.5)), (q_count, 1))
    flops = np.tile(np.where(last_expert == 2, 5.0, 1.0), (q_count, 1))
    quality[:, 0] = flops[:, 0] = 0
    env = plain_env(make_table(quality, flops, n, t_max))
    # each call is rewarded by its answer's quality, so with expert 1 always right and cheap the best
    # episode calls it at every step: 3 x (1 - 0.1) + gamma at T_max = 3.2 (no label-based early end)
    r = env_lib.Rewards(alpha=0.1, beta=0.5, gamma=0.5, p0=0.9)
    config = ppo.PPOConfig(num_envs=32, num_steps=8, total_timesteps=32 * 8 * 60, hidden=(32, 32))
    train = jax.jit(jax.vmap(ppo.make_train(config, env, r, env_lib), in_axes=(0, None, None)))
    states, history = train(jax.random.split(jax.random.key(0), 3), 0.1, env)
    params = states.params
    graphdef = ppo.policy_graph(env, config)
    always_1 = child(child(child(0, 1, n), 1, n), 1, n)
    for seed in range(3):
        out = env_lib.evaluate(env, r, ppo.greedy_policy(graphdef, ppo.select(params, seed)),
                               jax.random.key(1))
        np.testing.assert_array_equal(out["node"], always_1)
        np.testing.assert_allclose(out["return"], 3 * (1.0 - 0.1) + 0.5, atol=1e-5)
    returns = np.asarray(history["episode_return"])
    assert returns[:, -5:].mean() > returns[:, :5].mean()


def test_ppo_config_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="below one update"):
        ppo.PPOConfig(num_envs=8, num_steps=8, total_timesteps=10)
    with pytest.raises(ValueError, match="num_minibatches"):
        ppo.PPOConfig(num_envs=3, num_steps=3, total_timesteps=90, num_minibatches=4)


QUESTIONS = [Question("q0", "What is 2 times 3?", ("6",), "numeric", "multiply"),
             Question("q1", "Is 40 larger than 12? Answer yes or no.", ("yes",), "yes_no", "compare"),
             Question("q2", "Ana is a pilot who lives in Oslo. In which city does Ana live?", ("Oslo",), "f1",
                      "extract")]


@pytest.fixture(scope="module")
def tiny_pool(tiny_smollm2):
    """Two experts (chat and few-shot) on SmolLM2's tokenizer with small random weights: the precompute
    machinery (units, resume, hosts, FLOPs) does not need trained answers."""
    smollm2 = tiny_smollm2
    experts = [ExpertConfig("chat", "smollm2-135m-instruct", "chat", max_new_tokens=4),
               ExpertConfig("fewshot", "smollm2-135m-instruct", "fewshot", max_new_tokens=4)]
    return ExpertPool(experts, batch_size=8, loaded={"smollm2-135m-instruct": smollm2}), Encoder(smollm2)


class Crashing:
    """A pool that fails after `calls_before_crash` calls (None: never) and counts its calls."""

    def __init__(self, pool, calls_before_crash=None):
        self.pool, self.crash_after, self.calls = pool, calls_before_crash, 0
        self.experts, self.ktp_template = pool.experts, pool.ktp_template

    def __len__(self):
        return len(self.pool)

    def call(self, *args, **kwargs):
        if self.crash_after is not None and self.calls >= self.crash_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        return self.pool.call(*args, **kwargs)


def test_precompute_resumes_after_interruption(tiny_pool, tmp_path):
    pool, encoder = tiny_pool
    kwargs = dict(t_max=2, chunk=2, progress=False)
    whole = precompute(pool, encoder, QUESTIONS, tmp_path / "whole", **kwargs)
    crashing = Crashing(pool, calls_before_crash=5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        precompute(crashing, encoder, QUESTIONS, tmp_path / "resumed", **kwargs)
    # units: depth 1 = 2 experts x 2 chunks, depth 2 = 2 experts x 3 chunks -> 10; 5 were done
    assert len(list((tmp_path / "resumed" / "units").glob("*.json"))) == 5
    counting = Crashing(pool)
    resumed = precompute(counting, encoder, QUESTIONS, tmp_path / "resumed", **kwargs)
    assert counting.calls == 5  # only the missing units ran
    assert resumed.answers == whole.answers
    np.testing.assert_array_equal(resumed.flops, whole.flops)
    np.testing.assert_array_equal(resumed.quality, whole.quality)
    np.testing.assert_allclose(resumed.answer_emb, whole.answer_emb, atol=1e-5)
    # every node's answer came from its parent's: depth-2 nodes are expert calls on depth-1 answers
    assert whole.quality.shape == (3, num_nodes(2, 2)) and all(path_of(m, 2) for m in range(1, 7))
    assert np.all(whole.flops[:, 1:] > 0) and np.all(whole.answer_emb[:, 0] == 0)
    with pytest.raises(ValueError, match="different questions, experts or settings"):
        precompute(pool, encoder, QUESTIONS[:2], tmp_path / "whole", **kwargs)


def test_precompute_splits_across_hosts(tiny_pool, tmp_path):
    import threading

    pool, encoder = tiny_pool
    kwargs = dict(t_max=2, chunk=2, progress=False, poll_seconds=0.05)
    single = precompute(pool, encoder, QUESTIONS, tmp_path / "single", **kwargs)
    host_pools = [Crashing(pool), Crashing(pool)]
    results = {}

    def host(h):
        results[h] = precompute(host_pools[h], encoder, QUESTIONS, tmp_path / "shared", host=h, num_hosts=2,
                                **kwargs)

    worker = threading.Thread(target=host, args=(1,))
    worker.start()
    host(0)
    worker.join(timeout=300)
    assert host_pools[0].calls + host_pools[1].calls == 10 and min(p.calls for p in host_pools) >= 4
    for table in results.values():
        assert table.answers == single.answers
        np.testing.assert_array_equal(table.quality, single.quality)


def test_expert_flops_count_prompt_ktp_and_generated_tokens(tiny_pool):
    pool, _ = tiny_pool
    answers, flops = pool.call(0, [QUESTIONS[0].text, QUESTIONS[0].text], [None, "The answer is 6."])
    params = pool.parameters["smollm2-135m-instruct"]
    plain, with_ktp = len(pool.prompt(0, QUESTIONS[0].text, None)), len(pool.prompt(0, QUESTIONS[0].text, "x"))
    assert with_ktp > plain
    assert flops[0] >= 2 * params * (plain + 1) and flops[0] <= 2 * params * (plain + 4)
    assert flops[1] > flops[0]
    tokenizer = pool.models["smollm2-135m-instruct"][1]
    assert 'Another student answered: "The answer is 6."' in tokenizer.decode(
        pool.prompt(0, QUESTIONS[0].text, "The answer is 6."))


def test_route_runs_end_to_end(tmp_path, route_run):
    from jaxdistill.router.run import run

    c, results = route_run
    c, out = c.copy_and_resolve_references(), Path(c.workdir)  # the notebook test reads the same run
    summary = (out / "summary.md").read_text()
    for method in ("router (PPO)", "single: chat", "round-robin x2 (best order on train)",
                   "round-robin x2 (mean over orders)", "self-correction: fewshot x2", "random (router's mean calls)",
                   "kNN router", "oracle path (reads test labels)"):
        assert f"| {method} |" in summary
    assert "Router vs the strongest baselines" in summary and (out / "cost_quality.png").stat().st_size > 1000
    assert (out / "training_curves.png").stat().st_size > 1000
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 3 * 10  # alphas {0, 0.1 (the default), 0.5} x seeds x updates
    assert set(json.loads(lines[0])) >= {"alpha", "seed", "update", "episode_return", "entropy"}
    board = read_board(out)  # the same curves, the summary and both plots in TensorBoard
    first = json.loads(lines[0])
    assert board["scalars"][f"episode_return/alpha_{first['alpha']:g}/seed_0"][1] == pytest.approx(
        first["episode_return"])
    assert len(board["scalars"]["episode_return/alpha_0.5/seed_2"]) == 10
    assert board["scalars"]["frontier_auc/router__PPO_"][10] == pytest.approx(results["auc"]["router (PPO)"])
    assert "Router vs the strongest baselines" in board["text"]["summary/text_summary"]
    assert set(board["images"]) == {"cost_quality", "training_curves"}
    for alpha, rows in zip(results["alphas"], results["per_alpha"], strict=True):
        # the oracle bounds every method's quality at the alpha's price, and each CI holds its mean
        score = lambda row, a=alpha: row["quality"] - a * row["cost"]  # noqa: E731
        oracle = score(rows["oracle path (reads test labels)"])
        for row in rows.values():
            assert score(row) <= oracle + 1e-5 and row["quality_ci"][0] <= row["quality"] <= row["quality_ci"][1]
    questions = results["questions"]
    assert len(questions["node"]["router (PPO)"]) == 3 and len(questions["families"]) == 4
    # docs/router.md's tables come from results.json alone, as the run's own summary prints them
    from jaxdistill.router.evaluate import default_table, family_table, sweep_table

    recorded = json.loads((out / "results.json").read_text())
    assert default_table(recorded) in summary and family_table(recorded) in summary
    for row in family_table(recorded).splitlines()[2:]:  # path counts out of 3 seeds x the family's questions
        family = row.split(" | ")[0][2:]
        assert f"/{3 * questions['families'].count(family)})" in row
    assert len(sweep_table(recorded).splitlines()) == 2 + len(results["alphas"])
    restored = ocp.StandardCheckpointer().restore(out / "policy")
    assert jax.tree.leaves(restored)[0].shape[:2] == (3, 3)  # (alphas, seeds)
    # the same command gives the same numbers (a fresh workdir sharing the precompute)
    c.workdir, c.precompute.dir = str(tmp_path / "again"), str(out / "precompute")
    again = run(c)
    assert again["per_alpha"] == results["per_alpha"]
    # a rerun under a results-changing setting is refused before any work, naming it
    c.env.beta = 0.7
    with pytest.raises(RunError, match=r"other settings \(env.beta: 0.5 -> 0.7\)"):
        run(c)


def test_gpu_pool_config_points_at_weights_on_disk(tmp_path):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "experiments" / "router" / "gpu_pool.py"
    spec = importlib.util.spec_from_file_location("router_gpu_pool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    assert len(c.experts) >= 3 and all(e["model"].startswith("{weights}/") for e in c.experts)
    c.weights = str(tmp_path)
    c.workdir = str(tmp_path / "run")
    from jaxdistill.router.run import build_table

    with pytest.raises(FileNotFoundError, match="Llama-3.2-3B-Instruct"):
        build_table(c, tmp_path / "run")

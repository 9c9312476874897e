"""DMB's math: the rate matrix against dense matrix exponentials, the SEDD baselines' closed forms against
the generic formulas, the ELBO of the exact score against the true NLL, the sampler, and bad inputs."""

import math
import statistics

import pytest
import scipy.linalg
import torch
from torch import nn

from slimrate.dmb import (
    AbsorbingRates,
    GeometricNoise,
    LogLinearNoise,
    RateMatrix,
    ScoreNet,
    ScoreNetConfig,
    UniformRates,
    data_permutation,
    elbo_bits,
    estimate_p0,
    initial_rates,
    matrix_loss,
    official_bits,
    reverse_sample,
)
from slimrate.dmb.losses import sample_categorical


def random_rate_matrix(L=3, V=5, scale=1.0):
    perm = torch.stack([torch.randperm(V) for _ in range(L)])
    return RateMatrix(perm, scale * (0.2 + torch.rand(L, V - 1, dtype=torch.float64)))


def dense_q(rates, pos):
    """Q (V, V) at position pos in state order, built entry by entry from the definition (docs/dmb.md §3)."""
    if isinstance(rates, UniformRates):
        N = rates.vocab_size
        return (torch.ones(N, N, dtype=torch.float64) - N * torch.eye(N, dtype=torch.float64)) / N
    a, perm_inv = rates.rates()[pos].detach(), rates.perm_inv[pos]
    V = a.shape[0] + 1
    H = torch.zeros(V, V, dtype=torch.float64)
    for i in range(V):
        for j in range(i + 1, V):
            H[i, j] = a[j - 1]
        H[i, i] = -H[i].sum()
    Q = torch.zeros_like(H)
    Q[perm_inv[:, None], perm_inv[None, :]] = H  # Q[state(i), state(j)] = H[i, j]
    return Q


def dense_expm(rates, pos, h):
    return torch.from_numpy(scipy.linalg.expm(h * dense_q(rates, pos).numpy()))


FORWARD_PROCESSES = {"dmb": lambda: random_rate_matrix(), "absorb": lambda: AbsorbingRates(4, 3),
                     "uniform": lambda: UniformRates(5, 3)}


@pytest.mark.parametrize("name", FORWARD_PROCESSES)
def test_rows_cols_and_push_forward_match_dense_expm(name):
    rates = FORWARD_PROCESSES[name]()
    L, V = rates.seq_len, rates.vocab_size
    x = torch.randint(0, V, (4, L))
    h = torch.tensor([0.0, 0.3, 1.7, 6.9], dtype=torch.float64)
    rows = rates.transition_rows(x, h).detach()
    cols = rates.rate_cols(x).detach()
    p0 = torch.softmax(torch.randn(L, V, dtype=torch.float64), -1)
    pushed = rates.push_forward(p0, 1.7).detach()
    for pos in range(L):
        Q = dense_q(rates, pos)
        assert torch.allclose(Q.sum(1), torch.zeros(V, dtype=torch.float64), atol=1e-12)
        assert (Q - torch.diag(Q.diag()) >= 0).all()
        for b in range(4):
            expected = dense_expm(rates, pos, float(h[b]))[x[b, pos]]
            assert torch.allclose(rows[b, pos], expected, atol=1e-10), (name, pos, b)
            assert torch.allclose(cols[b, pos], Q[:, x[b, pos]], atol=1e-12)
        assert torch.allclose(pushed[pos], p0[pos] @ dense_expm(rates, pos, 1.7), atol=1e-10)
    assert torch.allclose(rows.sum(-1), torch.ones(4, L, dtype=torch.float64), atol=1e-12)
    assert (rows >= 0).all()


def test_lambda_is_reverse_cumulative_sum_of_rates():
    rates = random_rate_matrix(L=2, V=6)
    a, lam = rates.rates().detach(), rates.lam().detach()
    assert lam[:, -1].eq(0).all()
    for k in range(5):
        assert torch.allclose(lam[:, k], -a[:, k:].sum(1))


def test_permutation_ranks_most_frequent_first_and_absorbs_in_the_rarest():
    mu = torch.tensor([[0.1, 0.6, 0.05, 0.25], [0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    perm, perm_inv = data_permutation(mu)
    assert perm_inv.tolist() == [[1, 3, 0, 2], [0, 1, 2, 3]]
    assert torch.equal(perm.gather(1, perm_inv), torch.arange(4).expand(2, 4))


def test_gather_init_is_absorbing_into_the_last_rank():
    mu = torch.softmax(torch.randn(3, 6, dtype=torch.float64), -1)
    rates = RateMatrix.from_data(mu, "gather")
    lam = rates.lam().detach()
    assert torch.allclose(lam[:, :-1], -torch.ones(3, 5, dtype=torch.float64), atol=1e-8)
    # loglinear + gather: P(still at x0 at t) = e^{−σ̄(t)} = 1 − (1−ε)t, as SEDD-absorb (docs/dmb.md §10)
    noise, t = LogLinearNoise(), torch.tensor([0.4], dtype=torch.float64)
    x0 = rates.perm_inv[:, :1].t()  # the most frequent state at every position
    stay = rates.transition_rows(x0, noise.total(t)).detach().gather(-1, x0[..., None])
    assert torch.allclose(stay, torch.full_like(stay, 1 - (1 - noise.eps) * 0.4), atol=1e-7)


def test_prior_matching_init_carries_the_data_marginal_to_the_prior():
    mu = torch.softmax(2 * torch.randn(3, 7, dtype=torch.float64), -1)
    h_T = 6.9
    rates = RateMatrix.from_data(mu, "prior-matching", h_T=h_T)
    pushed = rates.push_forward(mu, h_T).detach()
    assert torch.allclose(pushed, torch.full_like(pushed, 1 / 7), atol=1e-6)


def test_matrix_loss_decreases_and_is_nonnegative():
    mu = torch.softmax(2 * torch.randn(4, 6, dtype=torch.float64), -1)
    rates = RateMatrix.from_data(mu, "gather")
    opt = torch.optim.AdamW([rates.raw], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = matrix_loss(rates, mu, mu, 6.9)
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(rates.raw.grad).all()
        opt.step()
        losses.append(loss.item())
    assert min(losses) >= 0
    assert losses[-1] < 0.9 * losses[0]


def generic_score_entropy(rates, logscore, x_t, x0, h, sigma):
    """Σ_l Σ_{y≠x_t} σ·Q[y, x_t]·(e^s − r s + r(log r − 1)) from dense rows and columns (docs/dmb.md §4)."""
    rows = rates.transition_rows(x0, h).detach()
    w = rates.rate_cols(x_t).detach() * sigma[:, None, None]
    w = w.scatter(-1, x_t[..., None], 0.0)
    r = rows / rows.gather(-1, x_t[..., None])
    return (w * (logscore.exp() - r * logscore + torch.xlogy(r, r) - r)).sum((1, 2))


@pytest.mark.parametrize("name", FORWARD_PROCESSES)
def test_score_entropy_matches_the_generic_formula(name):
    rates = FORWARD_PROCESSES[name]()
    L, V = rates.seq_len, rates.vocab_size
    x0 = torch.randint(0, V - (name == "absorb"), (6, L))
    h = 0.1 + 3 * torch.rand(6, dtype=torch.float64)
    sigma = 0.5 + torch.rand(6, dtype=torch.float64)
    x_t = sample_categorical(rates.transition_rows(x0, h).detach())
    logscore = torch.randn(6, L, V, dtype=torch.float64)
    got = rates.score_entropy(logscore, x_t, x0, h, sigma)
    expected = generic_score_entropy(rates, logscore, x_t, x0, h, sigma)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-9), (got, expected)
    # 0 at the true conditional ratio (the constant term makes the loss a Bregman divergence)
    rows = rates.transition_rows(x0, h).detach()
    exact = torch.log(rows.clamp_min(1e-300)) - torch.log(rows.gather(-1, x_t[..., None]))
    assert rates.score_entropy(exact, x_t, x0, h, sigma).abs().max() < 1e-9


@pytest.mark.parametrize("name", ["absorb", "uniform"])
def test_tweedie_step_matches_dense_bayes_rule(name):
    """p(x_s = y | x_t) ∝ p_s(y)·exp(ΔσQ)[y, x_t] with the exact score s = p_t(·)/p_t(x_t)."""
    rates = FORWARD_PROCESSES[name]()
    V = rates.vocab_size
    p_s = torch.softmax(torch.randn(V, dtype=torch.float64), -1)
    dsigma = 0.4
    p_t = p_s @ dense_expm(rates, 0, dsigma)
    x = torch.tensor([[V - 1, 1, 0]])
    score = (p_t / p_t[x[0]][:, None]).unsqueeze(0)  # (1, 3, V)
    got = rates.tweedie_probs(score, x, torch.tensor([dsigma], dtype=torch.float64))
    for pos in range(3):
        expected = p_s * dense_expm(rates, 0, dsigma)[:, x[0, pos]] / p_t[x[0, pos]]
        assert torch.allclose(got[0, pos], expected, atol=1e-10)


class ExactScore(nn.Module):
    """The true concrete score log p_t(x with x_l = y) − log p_t(x) of p_data (S, S) (two positions)."""

    def __init__(self, rates, p_data):
        super().__init__()
        self.rates, self.p = rates, p_data

    def marginals(self, h):  # (B,) → (B, S, S)
        S, B = self.rates.vocab_size, h.shape[0]
        states = torch.arange(S).repeat(B)[:, None].expand(B * S, 2)
        R = self.rates.transition_rows(states, h.double().repeat_interleave(S)).view(B, S, 2, S)
        return torch.einsum("ij,bik,bjl->bkl", self.p, R[:, :, 0], R[:, :, 1])

    def forward(self, x, h):
        logp = self.marginals(h).clamp_min(1e-300).log()
        b = torch.arange(x.shape[0])
        base = logp[b, x[:, 0], x[:, 1]]
        return torch.stack([logp[b, :, x[:, 1]], logp[b, x[:, 0], :]], dim=1) - base[:, None, None]


@pytest.mark.parametrize("protocol", ["ours", "ours-stratified", "official"])
@pytest.mark.parametrize("name", FORWARD_PROCESSES)
def test_elbo_of_the_exact_score_equals_the_true_nll(name, protocol):
    """With the exact score the bound of x0 is −log p_data(x0) + E_{x_T|x0} log(p_T(x_T)/p_base(x_T)): the
    true NLL plus the (exactly computable, here < 1%) cost of starting the reverse chain from the factorised
    prior p_base instead of the true p_T.  The Monte Carlo estimate must agree within 4 standard errors."""
    V = 3
    rates = {"dmb": lambda: random_rate_matrix(L=2, V=V), "absorb": lambda: AbsorbingRates(V, 2),
             "uniform": lambda: UniformRates(V, 2)}[name]()
    S = rates.vocab_size
    p = torch.zeros(S, S, dtype=torch.float64)
    p[:V, :V] = 0.2 + torch.rand(V, V, dtype=torch.float64)
    p /= p.sum()
    net, noise = ExactScore(rates, p), LogLinearNoise()
    h_T = float(noise.total(torch.tensor(1.0, dtype=torch.float64)))
    with torch.no_grad():
        p_base = rates.push_forward(torch.stack([p.sum(1), p.sum(0)]), h_T)
        p_T = net.marginals(torch.tensor([h_T]))[0]
        log_mismatch = p_T.clamp_min(1e-300).log() - (p_base[0][:, None] * p_base[1][None, :]).log()  # (S, S)
        flat = torch.multinomial(p.reshape(-1), 4000, replacement=True)
        x0 = torch.stack([flat // S, flat % S], 1)
        if protocol.startswith("ours"):
            samples = 8 if protocol == "ours-stratified" else 2
            result = elbo_bits(net, rates, noise, p_base, x0, samples=samples, batch=4000)
        else:
            result = official_bits(net, rates, noise, p_base, x0, repeats=4, batch=4000)
        rows_T = rates.transition_rows(x0, torch.full((4000,), h_T, dtype=torch.float64))  # (N, 2, S)
        mismatch = torch.einsum("na,nb,ab->n", rows_T[:, 0], rows_T[:, 1], log_mismatch)
        nll = -p[x0[:, 0], x0[:, 1]].log()
    expected = float((nll + mismatch).mean()) / (2 * math.log(2))
    assert abs(result.bits_per_token - expected) < 4 * result.standard_error, (result, expected)
    assert float(mismatch.mean()) < 0.01 * float(nll.mean())


def test_official_protocol_agrees_with_ours_on_a_random_net():
    """Both protocols estimate ∫₀¹ DWDSE dt + the prior KL (the official one up to its ∫₀^ε part, ~10⁻¹⁰): on one
    untrained net with a perturbed output layer they must agree within 3 combined standard errors, and their
    prior terms (computed exactly by both) must be equal."""
    rates, noise = random_rate_matrix(L=6, V=5), LogLinearNoise()
    net = ScoreNet(ScoreNetConfig.preset("tiny", 5, 6))
    with torch.no_grad():
        net.output.weight.normal_(0, 0.05)  # zero-initialised: a non-trivial score
        h_T = float(noise.total(torch.tensor(1.0, dtype=torch.float64)))
        p_T = rates.push_forward(torch.softmax(torch.randn(6, 5, dtype=torch.float64), -1), h_T)
        x0 = torch.randint(0, 5, (200, 6))
        ours = elbo_bits(net, rates, noise, p_T, x0, samples=8, generator=torch.Generator().manual_seed(1))
        theirs = official_bits(net, rates, noise, p_T, x0, repeats=20, generator=torch.Generator().manual_seed(2))
    se = math.hypot(ours.standard_error, theirs.standard_error)
    assert abs(ours.bits_per_token - theirs.bits_per_token) < 3 * se, (ours, theirs)
    assert theirs.prior_bits == pytest.approx(ours.prior_bits, rel=1e-12)
    assert len(theirs.per_repeat) == 20 and theirs.bits_per_token == pytest.approx(sum(theirs.per_repeat) / 20)
    assert theirs.standard_error == pytest.approx(statistics.stdev(theirs.per_repeat) / math.sqrt(20))


def test_bound_standard_error_matches_the_spread_of_repeated_estimates():
    """The stratified estimator's standard error (from the two draws per stratum) must predict how much the
    estimate moves between seeds: the SD of 60 estimates within 25% of the root mean square of the reported
    errors (their squares are unbiased; the SD of 60 draws is itself within ±9% at one sigma; an error off by
    √2 fails), on an untrained net with a perturbed output layer."""
    torch.manual_seed(0)
    rates, noise = random_rate_matrix(L=6, V=5), LogLinearNoise()
    net = ScoreNet(ScoreNetConfig.preset("tiny", 5, 6))
    with torch.no_grad():
        net.output.weight.normal_(0, 0.05)
        p_T = rates.push_forward(torch.softmax(torch.randn(6, 5, dtype=torch.float64), -1),
                                 float(noise.total(torch.tensor(1.0, dtype=torch.float64))))
        x0 = torch.randint(0, 5, (40, 6))
        results = [elbo_bits(net, rates, noise, p_T, x0, samples=8, generator=torch.Generator().manual_seed(seed))
                   for seed in range(60)]
    spread = statistics.stdev(r.bits_per_token for r in results)
    reported = math.sqrt(statistics.mean(r.standard_error**2 for r in results))
    assert 0.75 < spread / reported < 1.25, (spread, reported)


@pytest.mark.parametrize("samples", [0, 1, 3, True, 2.5])
def test_bound_rejects_an_odd_or_too_small_number_of_times(samples):
    rates = random_rate_matrix(L=2, V=3)
    with pytest.raises(ValueError, match=f"samples: expected an even int >= 2 .*got {samples!r}"):
        elbo_bits(None, rates, LogLinearNoise(), torch.full((2, 3), 1 / 3, dtype=torch.float64),
                  torch.zeros(1, 2, dtype=torch.int64), samples=samples)


@pytest.mark.parametrize("repeats", [0, 1, True, 2.5])
def test_official_protocol_rejects_fewer_than_two_repeats(repeats):
    rates = random_rate_matrix(L=2, V=3)
    with pytest.raises(ValueError, match=f"repeats: expected an int >= 2 .*got {repeats!r}"):
        official_bits(None, rates, LogLinearNoise(), torch.full((2, 3), 1 / 3, dtype=torch.float64),
                      torch.zeros(1, 2, dtype=torch.int64), repeats=repeats)


@pytest.mark.parametrize("name, method", [("dmb", "euler"), ("absorb", "euler"), ("absorb", "analytic"),
                                          ("uniform", "euler"), ("uniform", "analytic")])
def test_sampler_returns_data_tokens(name, method):
    rates = FORWARD_PROCESSES[name]()
    L, V = rates.seq_len, rates.vocab_size
    data_vocab = V - 1 if name == "absorb" else V
    p0 = torch.zeros(L, V, dtype=torch.float64)
    p0[:, :data_vocab] = torch.softmax(torch.randn(L, data_vocab, dtype=torch.float64), -1)
    p_T = rates.push_forward(p0, 6.9).detach()

    def net(x, h):  # a crude score: random log-ratios
        return torch.randn(*x.shape, V)

    result = reverse_sample(net, rates, LogLinearNoise(), p_T, n=7, steps=5, method=method)
    assert result.tokens.shape == (7, L) and result.tokens.dtype == torch.int64
    assert result.tokens.min() >= 0 and result.tokens.max() < data_vocab
    p0_hat = estimate_p0(result.last_probs, shared_positions=True)
    assert torch.allclose(p0_hat.sum(-1), torch.ones(L, dtype=torch.float64)) and (p0_hat > 0).all()


def test_sampler_rejects_the_analytic_step_for_dmb():
    rates = random_rate_matrix()
    p_T = torch.full((3, 5), 0.2, dtype=torch.float64)
    with pytest.raises(ValueError, match="'analytic' needs a fixed forward process"):
        reverse_sample(lambda x, h: torch.zeros(*x.shape, 5), rates, LogLinearNoise(), p_T, 2, 2, method="analytic")


def test_sampler_recovers_a_one_position_distribution_with_the_exact_score():
    """L = 1: the exact score p_t(y)/p_t(x) makes the reverse chain sample p_data."""
    p_data = torch.tensor([0.6, 0.3, 0.1, 0.0], dtype=torch.float64)  # index 3 = [MASK]
    rates, noise = AbsorbingRates(3, 1), LogLinearNoise()

    def net(x, h):
        states = torch.arange(4).repeat(len(h))[:, None]
        R = rates.transition_rows(states, h.double().repeat_interleave(4)).view(len(h), 4, 4)
        p_t = torch.einsum("i,bij->bj", p_data, R)  # (B, V)
        return (p_t.clamp_min(1e-300).log() - p_t.gather(1, x).clamp_min(1e-300).log())[:, None, :]

    p_T = rates.push_forward(p_data[None], noise.total(torch.tensor(1.0, dtype=torch.float64))).detach()
    tokens = reverse_sample(net, rates, noise, p_T, n=3000, steps=20, method="analytic").tokens
    freq = torch.bincount(tokens[:, 0], minlength=3).double() / 3000
    assert torch.allclose(freq, p_data[:3], atol=0.04), freq


def test_noise_schedules_rate_is_the_derivative_of_the_total():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    for noise in (LogLinearNoise(), GeometricNoise()):
        d = 1e-6
        numeric = (noise.total(t + d) - noise.total(t - d)) / (2 * d)
        assert torch.allclose(numeric, noise.rate(t), rtol=1e-5)
    assert LogLinearNoise().total(torch.tensor(0.0)) == 0


def test_noise_schedules_time_at_inverts_the_total():
    t = torch.cat([torch.rand(100, dtype=torch.float64), torch.tensor([1e-9, 1.0], dtype=torch.float64)])
    for noise in (LogLinearNoise(), LogLinearNoise(eps=0.05), GeometricNoise()):
        torch.testing.assert_close(noise.time_at(noise.total(t)), t, rtol=1e-9, atol=1e-15)


def test_rejects_token_ids_outside_the_vocabulary():
    rates = random_rate_matrix(L=3, V=5)
    with pytest.raises(ValueError, match=r"x0: expected token ids in \[0, 5\)"):
        rates.transition_rows(torch.tensor([[0, 5, 1]]), torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="x: expected token ids"):
        UniformRates(5, 3).rate_cols(torch.tensor([[-1, 0, 1]]))


def test_rejects_negative_rates():
    with pytest.raises(ValueError, match="rates: expected finite rates a_i >= 0"):
        RateMatrix(torch.arange(4).expand(2, 4), torch.tensor([[0.1, -0.2, 0.3], [0.1, 0.1, 0.1]]))
    with pytest.raises(ValueError, match="value: expected a rate >= 0"):
        initial_rates("constant", torch.full((2, 4), 0.25), torch.arange(4).expand(2, 4), value=-1.0)


def test_rejects_negative_total_noise():
    rates = random_rate_matrix(L=3, V=5)
    with pytest.raises(ValueError, match="h: expected finite values >= 0"):
        rates.transition_rows(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0.5, -0.1], dtype=torch.float64))
    with pytest.raises(ValueError, match="h: expected a finite total noise >= 0"):
        rates.push_forward(torch.full((3, 5), 0.2, dtype=torch.float64), -1.0)


def test_rejects_bad_permutations_and_distributions():
    with pytest.raises(ValueError, match="perm: expected each row to be a permutation"):
        RateMatrix(torch.tensor([[0, 0, 1]]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="p0: expected rows summing to 1"):
        random_rate_matrix(L=3, V=5).push_forward(torch.full((3, 5), 0.5, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="init: expected one of"):
        RateMatrix.from_data(torch.full((2, 4), 0.25, dtype=torch.float64), "random")

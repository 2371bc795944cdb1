"""The γ-exponent calculus of one LoRA module (Hayou, Ghosh, Yu 2024, §3) and its width sweep."""

import json
from fractions import Fraction

import pytest
import torch

from lorainit.engine import rng
from lorainit.errors import BadInput
from lorainit.theory import calculus

QUANTITIES = ("Z_A", "Z_B", "delta1", "delta2", "delta3")
# widths 2^8 .. 2^13 and 2 seeds keep each sweep to about a second
TEST_WIDTHS = tuple(2**k for k in range(8, 14))


def _gammas(row):
    return {q: row[q] for q in QUANTITIES}


def test_init_a_at_half_is_efficient_but_internally_unstable():
    e = calculus.exponents("a", 0.5)
    assert _gammas(e) == {"Z_A": 0.5, "Z_B": 0.0, "delta1": 0.0, "delta2": 0.0, "delta3": 0.0}
    assert (e["output_stable"], e["internally_stable"], e["efficient"]) == (True, False, True)
    assert e["lr_exponent"] == -0.5


def test_init_a_at_one_is_stable_but_not_efficient():
    e = calculus.exponents("a", 1)
    assert _gammas(e) == {"Z_A": 0.0, "Z_B": -1.0, "delta1": -1.0, "delta2": -1.0, "delta3": -1.0}
    assert (e["output_stable"], e["internally_stable"], e["efficient"]) == (True, True, False)


def test_init_b_at_half_blows_up_the_output():
    e = calculus.exponents("b", 0.5)
    assert _gammas(e) == {"Z_A": 0.5, "Z_B": 0.5, "delta1": 0.5, "delta2": 0.0, "delta3": 0.0}
    assert (e["output_stable"], e["internally_stable"], e["efficient"]) == (False, False, False)


def test_init_b_at_one_is_stable_but_b_is_undertrained():
    e = calculus.exponents("b", 1)
    assert _gammas(e) == {"Z_A": 0.0, "Z_B": 0.0, "delta1": 0.0, "delta2": -1.0, "delta3": -1.0}
    assert (e["output_stable"], e["internally_stable"], e["efficient"]) == (True, True, False)


def test_max_stable_c_is_the_smallest_output_stable_c():
    assert calculus.max_stable_c("a") == Fraction(1, 2)
    assert calculus.max_stable_c("b") == Fraction(1)
    for init in ("a", "b"):
        c_star = calculus.max_stable_c(init)
        assert calculus.exponents(init, c_star)["output_stable"]
        # any larger rate, however slightly, is unstable: γ[Z_B] > 0 just below c*
        assert not calculus.exponents(init, c_star - Fraction(1, 1000))["output_stable"]
    # the rates the task names: Init[B] at n^-0.75 and Init[A] at n^-0.25 are above their maxima
    assert not calculus.exponents("b", 0.75)["output_stable"]
    assert not calculus.exponents("a", 0.25)["output_stable"]


def test_zero_factor_absorbs_in_products():
    # an exactly-zero quantity times anything is exactly zero: γ = -inf, never a finite number
    assert (calculus.ZERO + calculus.ETA).at(Fraction(1, 2)) == float("-inf")
    assert (calculus.ZERO | calculus.ETA).at(Fraction(1, 2)) == Fraction(-1, 2)


def test_to_json_holds_the_maximal_rates_and_is_strict_json():
    out = calculus.to_json()
    assert out["a"]["max_stable_lr_exponent"] == -0.5
    assert out["b"]["max_stable_lr_exponent"] == -1.0
    assert out["a"]["at_max_stable"]["efficient"] is True
    assert out["b"]["at_max_stable"]["delta2"] == -1.0
    assert [row["c"] for row in out["b"]["table"]] == list(map(float, calculus.GRID))
    json.dumps(out, allow_nan=False)  # raises on a bare -inf


def test_format_table_rows_read_back():
    text = calculus.format_table(calculus.table(("a", "b"), (0.5, 1)))
    rows = [line.split() for line in text.splitlines()[1:]]
    assert rows == [
        ["a", "0.5", "-0.5", "0.5", "0", "0", "0", "0", "yes", "no", "yes"],
        ["a", "1", "-1", "0", "-1", "-1", "-1", "-1", "yes", "yes", "no"],
        ["b", "0.5", "-0.5", "0.5", "0.5", "0.5", "0", "0", "no", "no", "no"],
        ["b", "1", "-1", "0", "0", "0", "-1", "-1", "yes", "yes", "no"],
    ]


@pytest.mark.parametrize("init,c,named", [
    ("c", 0.5, "'c'"),
    ("A", 0.5, "'A'"),
    ("a", float("nan"), "nan"),
    ("a", float("inf"), "inf"),
    ("a", "0.5", "'0.5'"),
    ("b", None, "None"),
])
def test_bad_input_names_the_value(init, c, named):
    with pytest.raises(BadInput) as err:
        calculus.exponents(init, c)
    message = str(err.value)
    assert named in message
    assert ("a, b" in message) if init not in ("a", "b") else ("finite number" in message)


def test_bad_check_arguments_name_the_value():
    with pytest.raises(BadInput, match="'sgd'.*adam, signsgd"):
        calculus.check("sgd")
    with pytest.raises(BadInput, match="widths"):
        calculus.check("adam", widths=(256,))
    with pytest.raises(BadInput, match="steps must be an integer >= 2; got 1"):
        calculus.check("adam", steps=1)
    assert issubclass(BadInput, ValueError)


def test_signsgd_first_step_moves_z_a_by_exactly_eta_times_l1_norm():
    # Init[B], step 1: A = 0, so ∇A = (Bᵀg) zᵀ and SignSGD moves every entry of row k by
    # ±η with the sign of z_j: Z_A,k = ±η ||z||_1 for every k, the aligned sum of §3.
    n = 256
    result = calculus.check("signsgd", widths=(n, 2 * n), steps=2, seeds=1)
    z = torch.empty(n, 1, dtype=torch.float64).normal_(generator=rng.generator(0, "data"))
    expected = z.abs().sum().item() / n  # η = n^-1 at Init[B]'s maximal rate
    row = {(r["init"], r["width"], r["step"], r["quantity"]): r["value"] for r in result["rows"]}
    assert row[("b", n, 1, "Z_A")] == pytest.approx(expected, rel=1e-12)
    # the factor that starts at zero contributes nothing on the first step
    assert row[("b", n, 1, "delta2")] == 0.0  # δ² = ΔB A_old z with A_old = 0
    assert row[("a", n, 1, "delta1")] == 0.0  # δ¹ = B_old ΔA z with B_old = 0
    assert len(result["rows"]) == 2 * 2 * 1 * 2 * len(QUANTITIES)  # inits x widths x seeds x steps


@pytest.fixture(scope="module", params=["adam", "signsgd"])
def sweep(request):
    return calculus.check(request.param, widths=TEST_WIDTHS, steps=10, seeds=2)


def test_measured_slopes_match_the_calculus(sweep):
    slopes = {(r["init"], r["quantity"]): r for r in sweep["slopes"]}
    assert slopes[("a", "Z_A")]["lr_exponent"] == -0.5 and slopes[("b", "Z_A")]["lr_exponent"] == -1.0
    assert slopes[("a", "Z_A")]["predicted"] == 0.5 and slopes[("b", "delta2")]["predicted"] == -1.0
    for init in ("a", "b"):
        for q in ("Z_A", "Z_B", "delta2"):
            r = slopes[(init, q)]
            assert abs(r["measured"] - r["predicted"]) <= calculus.TOLERANCE, (init, q, r)


def test_format_check_shows_both_slopes_and_flags_a_mismatch(sweep):
    text = calculus.format_check(sweep)
    r = next(r for r in sweep["slopes"] if (r["init"], r["quantity"]) == ("b", "delta2"))
    line = next(line for line in text.splitlines() if line.split()[:3] == ["b", "-1", "delta2"])
    assert line.split()[3:5] == ["-1", f"{r['measured']:.3f}"]
    bad = {"settings": sweep["settings"], "slopes": [dict(r, measured=-0.8, diff=0.2)]}
    assert "off by > 0.1" in calculus.format_check(bad)
    assert "off by" not in line

import pytest

from visionzip_eval.budget import Budget


@pytest.mark.parametrize(
    "value, split",
    [(64, (54, 10)), (128, (108, 20)), (192, (162, 30)), ("64", (54, 10)), ("54+10", (54, 10)),
     (" 108 + 20 ", (108, 20)), ("50+14", (50, 14)), (32, (27, 5)), (256, (216, 40)), (2, (1, 1))],
)
def test_parse_gives_split(value, split):
    budget = Budget.parse(value)
    assert (budget.dominant, budget.contextual) == split
    assert budget.total == sum(split)


@pytest.mark.parametrize("value", ["full", "FULL", None, "vanilla", Budget()])
def test_full(value):
    budget = Budget.parse(value)
    assert budget.is_full and budget.total is None and budget.label == "full"


@pytest.mark.parametrize("value, label", [(64, "64"), ("54+10", "64"), ("50+14", "50+14"), (32, "32"), ("full", "full")])
def test_label_round_trips(value, label):
    budget = Budget.parse(value)
    assert budget.label == label
    assert Budget.parse(budget.label) == budget


@pytest.mark.parametrize(
    "value, limit",
    [(0, ">= 2"), (-64, ">= 2"), (1, ">= 2"), ("0+10", "dominant must be >= 1"),
     ("54+0", "contextual must be >= 1"), ("-3+10", "dominant must be >= 1"),
     ("sixty", "invalid budget"), ("54+", "invalid budget"), (6.4, "invalid budget"), (True, "invalid budget")],
)
def test_invalid_budgets_name_the_limit(value, limit):
    with pytest.raises(ValueError, match=limit.replace("+", r"\+")):
        Budget.parse(value)


def test_budget_must_fit_the_tower():
    Budget(576, 1).check_fits(577)
    with pytest.raises(ValueError, match="exceeds the vision tower's 577 tokens"):
        Budget(570, 8).check_fits(577)
    Budget.full().check_fits(1)

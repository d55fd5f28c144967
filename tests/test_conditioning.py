"""Null-condition batching: broadcasting, row selection, and the errors that name the argument."""

import pytest
import torch

from kdiff_align.core import conditioning


def test_null_rows_broadcast_numbers_and_batch_one_tensors():
    kwargs = {'class_cond': torch.tensor([1, 2, 3]), 'cross': torch.randn(3, 4, 2), 'shared': torch.ones(5)}
    rows = torch.tensor([0, 2])
    null = conditioning.null_rows(kwargs, {'class_cond': 10, 'cross': torch.zeros(1, 4, 2)}, rows, 3, torch.device('cpu'))
    assert null['class_cond'].tolist() == [10, 10] and null['class_cond'].dtype == torch.long
    assert null['cross'].shape == (2, 4, 2) and not null['cross'].any()
    assert null['shared'] is kwargs['shared']  # not batched: shared by both branches
    both = conditioning.cat_rows(conditioning.take_rows(kwargs, rows, 3), null, 2, 2)
    assert both['class_cond'].tolist() == [1, 3, 10, 10] and both['cross'].shape == (4, 4, 2)


def test_where_rows_picks_per_row():
    a, b = {'c': torch.tensor([7, 7, 7])}, {'c': torch.tensor([1, 2, 3])}
    assert conditioning.where_rows(torch.tensor([True, False, True]), a, b)['c'].tolist() == [7, 2, 7]


@pytest.mark.parametrize('first, second, message', [
    ({'a': torch.ones(2)}, {'b': torch.ones(2)}, "differ in names (['a'] vs ['b'])"),
    ({'a': torch.ones(5)}, {'a': torch.zeros(5)}, "keyword argument 'a' is not batched ((5,) for 2 rows"),
    ({'mode': 'x'}, {'mode': 'y'}, "keyword argument 'mode' differs between the branches ('x' vs 'y')"),
])
def test_cat_rows_errors_name_the_argument(first, second, message):
    with pytest.raises(ValueError) as err:
        conditioning.cat_rows(first, second, 2, 2)
    assert message in str(err.value)


def test_check_uncond_errors():
    with pytest.raises(TypeError, match=r'uncond must be a dict of keyword arguments .* got list'):
        conditioning.check_uncond([10])
    with pytest.raises(TypeError, match='uncond keys must be keyword-argument names, got 1'):
        conditioning.check_uncond({1: 10})
    assert conditioning.check_uncond(None) == {}

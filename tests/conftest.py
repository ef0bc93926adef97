"""Shared fixtures: the trained models and their data, loaded once per session."""

import pytest
import torch


@pytest.fixture(scope="session")
def digits():
    """(calibration batches, calib inputs, test inputs, test labels) of scikit-learn digits."""
    from fxcompress.demo.digits import digits_data

    x_cal, _ = digits_data("calib")
    x_test, y_test = digits_data("test")
    batches = [(x_cal[i:i + 64],) for i in range(0, len(x_cal), 64)]
    return batches, x_cal, x_test, y_test


@pytest.fixture(scope="session")
def digits_cnn():
    """The shipped, trained digits CNN (eval mode)."""
    from fxcompress.demo.digits import load_digits_cnn

    torch.manual_seed(0)
    return load_digits_cnn()

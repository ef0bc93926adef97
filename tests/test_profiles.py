"""Hardware profiles: the built-ins load, user files work by path, bad files name the field."""

from pathlib import Path

import pytest

import fxcompress
from fxcompress import FxCompressError, load_profile

BUILTINS = ["apple-ane", "fpga-binary", "mcu-int8", "mobile-arm", "nvidia-gpu", "x86-avx2",
            "x86-host", "x86-server"]


def test_list_profiles_has_the_builtins():
    assert fxcompress.list_profiles() == BUILTINS


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_loads_with_sources(name):
    p = load_profile(name)
    assert p.name == name
    assert p.peak_gops[p.compute_dtype] > 0
    assert p.sources, "every built-in cites where its numbers come from"
    assert p.latency(1e6, 1e3, 1e3, p.compute_dtype) > 0


def test_profiles_differ_in_what_they_run():
    mobile, fpga, mcu = (load_profile(n) for n in ("mobile-arm", "fpga-binary", "mcu-int8"))
    assert mobile.supports("linear", "int8") and not mobile.allows("binary")
    assert fpga.allows("binary") and fpga.binary_activations
    assert mcu.int8_required and mcu.weight_budget_bytes is not None
    # int8 with quantized activations computes at the int8 peak, so it is faster on the roofline
    assert mobile.latency(1e8, 0, 0, "int8") < mobile.latency(1e8, 0, 0, "fp32")


def test_align_rounds_up_to_the_target_alignment():
    p = load_profile("mobile-arm")
    assert p.alignment == 8
    assert [p.align(n) for n in (1, 8, 9, 17)] == [8, 8, 16, 24]


def _write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "mine.toml"
    f.write_text(text)
    return f


def _base_text() -> str:
    from fxcompress.hardware_profiles import _builtin_dir

    return (_builtin_dir() / "mobile-arm.toml").read_text()


def test_user_profile_by_path(tmp_path):
    f = _write(tmp_path, _base_text().replace('name = "mobile-arm"', 'name = "my-phone"'))
    p = load_profile(str(f))
    assert p.name == "my-phone"
    assert load_profile(f).name == "my-phone"


def test_unknown_profile_names_the_builtins():
    with pytest.raises(FxCompressError, match="unknown profile 'tpu'.*mobile-arm"):
        load_profile("tpu")


def test_missing_file(tmp_path):
    with pytest.raises(FxCompressError, match="does not exist"):
        load_profile(str(tmp_path / "nope.toml"))


@pytest.mark.parametrize("old,new,field,fix", [
    ('objective = "latency"', 'objective = "speed"', "planner.objective", "latency"),
    ("fp32 = 179.2", 'fp32 = "fast"', "throughput.fp32", "number"),
    ("alignment = 8 ", "alignment = 0 ", "planner.alignment", "1 or more"),
    ('techniques = ["svd"', 'techniques = ["magic", "svd"', "planner.techniques", "'svd'"),
    ("bandwidth_gbs = 25.6", "bandwith_gbs = 25.6", "throughput.bandwith_gbs", "known fields"),
    ('runtime = "executorch-xnnpack"\n', "", "backend.runtime", "add it"),
])
def test_malformed_profile_names_field_and_fix(tmp_path, old, new, field, fix):
    text = _base_text()
    assert old in text
    f = _write(tmp_path, text.replace(old, new, 1))
    with pytest.raises(FxCompressError) as e:
        load_profile(str(f))
    assert f"'{field}'" in str(e.value) and fix in str(e.value)


def test_invalid_toml_syntax(tmp_path):
    f = _write(tmp_path, "name = \n")
    with pytest.raises(FxCompressError, match="not valid TOML"):
        load_profile(str(f))


def test_target_facts_come_from_the_profile_file(tmp_path):
    """Which ops run binary weights and whether grouped convs run dynamic int8 are profile
    fields, not code; the unread [sparsity] section is refused as unknown."""
    from fxcompress.hardware_profiles import _builtin_dir
    from fxcompress.passes.int8 import step_mode

    fpga = load_profile("fpga-binary")
    assert fpga.binary_ops == ("linear", "conv2d") and fpga.supports("conv2d", "binary")
    text = (_builtin_dir() / "fpga-binary.toml").read_text()
    linear_only = load_profile(str(_write(tmp_path, text.replace(
        'ops = ["linear", "conv2d"]    # FINN', 'ops = ["linear"]    # FINN'))))
    assert linear_only.supports("linear", "binary")
    assert not linear_only.supports("conv2d", "binary")
    with pytest.raises(FxCompressError, match="'binary.ops'"):
        load_profile(str(_write(tmp_path, text.replace(
            'ops = ["linear", "conv2d"]    # FINN', 'ops = ["embedding"]    # FINN'))))
    assert not load_profile("mobile-arm").int8_dynamic_grouped_conv
    assert step_mode("conv2d", 8, "qdq", "dynamic") == "weight_only"
    assert step_mode("conv2d", 8, "qdq", "dynamic", dynamic_grouped_conv=True) == "qdq_dynamic"
    with pytest.raises(FxCompressError, match="sparsity"):
        load_profile(str(_write(tmp_path, _base_text() + '\n[sparsity]\nstructured = "compute"\n')))


def test_profile_techniques_are_the_registered_ones():
    from fxcompress.hardware_profiles import TECHNIQUES, known_techniques
    from fxcompress.technique import REGISTRY

    assert set(known_techniques()) == set(REGISTRY) and TECHNIQUES == known_techniques()
    assert all(set(load_profile(n).techniques) <= set(REGISTRY)
               for n in fxcompress.list_profiles())


def test_int8_palette_entries_are_a_profile_fact(tmp_path):
    """[share] lut_int8 says whether the target decodes int8 palette entries; by default it
    does where it runs int8."""
    import dataclasses

    text = _base_text()
    assert load_profile("apple-ane").share_lut_int8
    no_lut = load_profile(str(_write(tmp_path, text.replace("[share]\n",
                                                            "[share]\nlut_int8 = false\n"))))
    assert no_lut.share_lut_int8 is False
    no_int8 = dataclasses.replace(load_profile("mobile-arm"), techniques=("svd", "share"),
                                  share_lut_int8=None)
    assert no_int8.share_lut_int8 is False
    with pytest.raises(FxCompressError, match="'share.lut_int8'"):
        load_profile(str(_write(tmp_path, text.replace("[share]\n",
                                                       '[share]\nlut_int8 = "yes"\n'))))

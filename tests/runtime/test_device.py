import pytest
import torch

from bus_core.errors import DeviceError
from bus_core.runtime.device import (
    DeviceConfig,
    autocast,
    choose_device,
    cpu_supports_bf16,
    fp32_cpu,
    needs_grad_scaler,
    prepare_model,
    to_device,
)


def test_cpu_fp32_is_plain():
    config = choose_device("cpu-fp32")
    assert config.device.type == "cpu" and config.amp_dtype is None and not config.channels_last
    assert config.description == "CPU, fp32"


def test_cpu_uses_bf16_only_where_supported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("bus_core.runtime.device._mps_available", lambda: False)
    monkeypatch.setattr("bus_core.runtime.device.cpu_supports_bf16", lambda: True)
    assert choose_device("auto").amp_dtype == torch.bfloat16
    assert choose_device("auto").channels_last
    monkeypatch.setattr("bus_core.runtime.device.cpu_supports_bf16", lambda: False)
    assert choose_device("auto") == fp32_cpu()


def test_unavailable_or_unknown_device_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="No CUDA GPU"):
        choose_device("cuda")
    with pytest.raises(DeviceError, match="Unknown device"):
        choose_device("tpu")


def test_autocast_and_memory_format_give_close_outputs():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        ref = conv(x)
        config = DeviceConfig(torch.device("cpu"), torch.bfloat16 if cpu_supports_bf16() else None,
                              channels_last=True)
        model = prepare_model(conv, config)
        with autocast(config):
            out = model(to_device(x, config))
    assert to_device(x, config).is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out.float(), ref, atol=0.05, rtol=0.05)


def test_grad_scaler_only_for_cuda_fp16():
    assert not needs_grad_scaler(fp32_cpu())
    assert needs_grad_scaler(DeviceConfig(torch.device("cuda"), torch.float16, True))


def test_only_native_bf16_counts(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True,
                        raising=False)  # oneDNN would emulate bf16 on AVX512: slower
    assert not cpu_supports_bf16()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert cpu_supports_bf16()

"""The CPU engine's allocator settings: applied through glibc's mallopt, switched off by the environment."""

from __future__ import annotations

import ctypes
import platform
import resource
import sys

import pytest
import torch

from joule.runtime import host_allocator
from joule.runtime.host_allocator import ENVIRONMENT_SWITCH, keep_freed_memory

glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_the_environment_switch_leaves_the_allocator_alone(monkeypatch, value):
    calls = []
    monkeypatch.setenv(ENVIRONMENT_SWITCH, value)
    monkeypatch.setattr(host_allocator.ctypes, "CDLL", lambda name: calls.append(name))
    assert keep_freed_memory() is False and calls == []


def test_a_c_library_without_mallopt_is_left_alone(monkeypatch):
    monkeypatch.delenv(ENVIRONMENT_SWITCH, raising=False)
    monkeypatch.setattr(host_allocator.sys, "platform", "linux")
    monkeypatch.setattr(host_allocator.ctypes, "CDLL", lambda name: object())  # no mallopt attribute
    assert keep_freed_memory() is False


def test_each_setting_reaches_mallopt_and_a_refused_one_says_so(monkeypatch):
    monkeypatch.delenv(ENVIRONMENT_SWITCH, raising=False)
    monkeypatch.setattr(host_allocator.sys, "platform", "linux")
    received, answers = [], iter([1, 1, 0])

    class FakeMallopt:
        def __call__(self, parameter, value):
            received.append((parameter, value))
            return next(answers)

    class FakeLibrary:
        mallopt = FakeMallopt()

    monkeypatch.setattr(host_allocator.ctypes, "CDLL", lambda name: FakeLibrary())
    assert keep_freed_memory() is False  # glibc refused the last one
    assert received == [(host_allocator.M_MMAP_THRESHOLD, 32 << 20), (host_allocator.M_TRIM_THRESHOLD, 1 << 30),
                        (host_allocator.M_TOP_PAD, 256 << 20)]


@pytest.mark.skipif(not glibc, reason="glibc's allocator only")
def test_on_glibc_freed_step_sized_blocks_come_back_without_page_faults(monkeypatch):
    """What the settings are for: a 12 MiB temporary, freed and asked for again, reuses the same pages."""
    monkeypatch.delenv(ENVIRONMENT_SWITCH, raising=False)
    assert keep_freed_memory() is True
    for _ in range(12):  # the heap grows until a freed block is taken again (~7 rounds under pytest): faults once
        torch.empty(12 << 20, dtype=torch.uint8).fill_(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.empty(12 << 20, dtype=torch.uint8).fill_(1)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 12 << 20 >> 12  # far fewer than one 12 MiB block's 3,072 pages, let alone five
    assert ctypes.CDLL(None).mallopt  # the symbol the settings went through

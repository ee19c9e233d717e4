"""A card's performance spec from what NVML reports, for cards the built-in table does not know.

Memory bandwidth: NVML's maximum memory clock is half the effective data rate for every memory type
it reports (GDDR6X, GDDR6, HBM2e, HBM3), so bandwidth = 2 x clock x bus width / 8. Checked against
the vendors' figures: RTX 4090 10501 MHz x 384 bit -> 1008 GB/s; H100 SXM 2619 MHz x 5120 bit ->
3352 GB/s; A100 80GB 1593 MHz x 5120 bit -> 2039 GB/s; RTX 3090 9751 MHz x 384 bit -> 936 GB/s.

FP16: SMs x clock x dense FP16 tensor FLOPs per SM per clock for the architecture (the same basis as
the table: FP16 accumulate on consumer cards). Rated boost clock when NVML gives it, else the max clock.
Checked: A100 108 SM x 1410 MHz x 2048 -> 312 TFLOPS; H100 SXM 132 x 1830 x 4096 -> 989; RTX 4090
128 x 2520 x 1024 -> 330; RTX 3090 82 x 1695 x 1024 -> 142; V100 80 x 1530 x 1024 -> 125.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from launcher.facts.cards import CardSpec, find_card

# Dense FP16 tensor FLOPs per SM per clock, by compute capability.
_FP16_FLOPS_PER_SM_CLOCK: dict[tuple[int, int], int] = {
    (7, 0): 1024,  # Volta: 8 tensor cores x 64 FMA
    (7, 2): 1024,
    (7, 5): 1024,  # Turing
    (8, 0): 2048,  # A100: 4 x 256 FMA
    (8, 6): 1024,  # GA10x
    (8, 7): 1024,
    (8, 9): 1024,  # Ada
    (9, 0): 4096,  # Hopper
    (10, 0): 8192,  # Blackwell datacenter
    (10, 3): 8192,
    (12, 0): 1024,  # Blackwell consumer
}
_PASCAL_FP16_FLOPS_PER_SM_CLOCK = 256  # no tensor cores: llama.cpp runs FP32, 128 lanes x FMA
_DEFAULT_FP16_FLOPS_PER_SM_CLOCK = 1024

# CUDA cores per SM, to turn nvmlDeviceGetNumGpuCores into SMs when the attribute query is refused.
_CORES_PER_SM: dict[tuple[int, int], int] = {(7, 0): 64, (7, 2): 64, (7, 5): 64, (8, 0): 64, (9, 0): 128}
_DEFAULT_CORES_PER_SM = 128  # GA10x, Ada, Blackwell

# When NVML cannot tell, plan with a modest card rather than none: the planner still works, and
# `corral status` shows the guess (GpuInfo.extra) so the operator can add the card to the table.
FALLBACK_MEM_BW_GBPS = 300.0
FALLBACK_FP16_TFLOPS = 50.0


@dataclass(frozen=True)
class NvmlCardFacts:
    """The NVML answers that determine a card's spec (0 = NVML did not say)."""

    name: str
    memory_total_bytes: int
    compute_capability: tuple[int, int] = (0, 0)
    sm_count: int = 0
    sm_clock_mhz: int = 0  # max SM clock
    sm_boost_clock_mhz: int = 0  # rated ("customer") boost clock
    mem_clock_mhz: int = 0
    mem_bus_width_bits: int = 0


def sm_count_from_cores(cores: int, compute_capability: tuple[int, int]) -> int:
    return cores // _CORES_PER_SM.get(compute_capability, _DEFAULT_CORES_PER_SM) if cores else 0


def fp16_flops_per_sm_clock(compute_capability: tuple[int, int]) -> int:
    if compute_capability[0] == 6:
        return _PASCAL_FP16_FLOPS_PER_SM_CLOCK
    return _FP16_FLOPS_PER_SM_CLOCK.get(compute_capability, _DEFAULT_FP16_FLOPS_PER_SM_CLOCK)


def marketing_name(nvml_name: str) -> str:
    """ "NVIDIA GeForce RTX 4070 SUPER" -> "GeForce RTX 4070 SUPER": the vendor prefix adds nothing."""
    return nvml_name.removeprefix("NVIDIA ").strip() or nvml_name


def card_from_nvml(facts: NvmlCardFacts) -> tuple[CardSpec, dict[str, str]]:
    """The table's card (with the real memory size) or one computed from NVML, plus notes on which.

    The notes go into GpuInfo.extra: "card_spec" is "table" or "nvml", "card_spec_note" says how
    a computed spec was derived and what had to be guessed.
    """
    table = find_card(facts.name)
    if table is not None:
        card = replace(table, vram_bytes=facts.memory_total_bytes or table.vram_bytes)
        return card, {"card_spec": "table"}

    notes: list[str] = []
    if facts.mem_clock_mhz and facts.mem_bus_width_bits:
        mem_bw_gbps = 2 * facts.mem_clock_mhz * 1e6 * facts.mem_bus_width_bits / 8 / 1e9
        notes.append(
            f"bandwidth {mem_bw_gbps:.0f} GB/s from memory clock {facts.mem_clock_mhz} MHz"
            f" x {facts.mem_bus_width_bits}-bit bus"
        )
    else:
        mem_bw_gbps = FALLBACK_MEM_BW_GBPS
        notes.append(f"memory clock or bus width unknown: bandwidth assumed {FALLBACK_MEM_BW_GBPS:.0f} GB/s")
    clock_mhz = facts.sm_boost_clock_mhz or facts.sm_clock_mhz
    if facts.sm_count and clock_mhz and facts.compute_capability != (0, 0):
        per_sm = fp16_flops_per_sm_clock(facts.compute_capability)
        fp16_tflops = facts.sm_count * clock_mhz * 1e6 * per_sm / 1e12
        notes.append(f"FP16 {fp16_tflops:.0f} TFLOPS from {facts.sm_count} SMs at {clock_mhz} MHz")
    else:
        fp16_tflops = FALLBACK_FP16_TFLOPS
        notes.append(f"SM count, clock or compute capability unknown: FP16 assumed {FALLBACK_FP16_TFLOPS:.0f} TFLOPS")
    card = CardSpec(
        name=marketing_name(facts.name),
        vram_bytes=facts.memory_total_bytes,
        mem_bw_gbps=round(mem_bw_gbps, 1),
        fp16_tflops=round(fp16_tflops, 1),
        compute_capability=facts.compute_capability,
        aliases=(facts.name,),
    )
    note = f"{facts.name!r} is not in the built-in card table; " + "; ".join(notes)
    return card, {"card_spec": "nvml", "card_spec_note": note}


def mig_card(
    parent: CardSpec, name: str, memory_total_bytes: int, sm_share: float, memory_share: float
) -> tuple[CardSpec, dict[str, str]]:
    """A MIG instance's share of its parent card: bandwidth by memory slices, FLOPS by SMs."""
    card = CardSpec(
        name=marketing_name(name),
        vram_bytes=memory_total_bytes,
        mem_bw_gbps=round(parent.mem_bw_gbps * memory_share, 1),
        fp16_tflops=round(parent.fp16_tflops * sm_share, 1),
        compute_capability=parent.compute_capability,
        aliases=(name,),
    )
    note = (
        f"MIG instance of {parent.name}: {memory_share:.0%} of its memory bandwidth, {sm_share:.0%} of its SMs;"
        " one MIG instance per backend (MIG instances cannot be grouped)"
    )
    return card, {"card_spec": "mig", "card_spec_note": note}

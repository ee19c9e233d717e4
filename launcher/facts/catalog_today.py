"""The models most pulled from the Ollama library today, with their architecture facts.

Shapes (layers, embedding length, heads, KV heads, head size, context, vocabulary, experts and
active experts, sliding window) are each model's published config.json on Hugging Face
(https://huggingface.co/<org>/<model>/blob/main/config.json, the org and model named per block);
parameter counts, quantizations and file sizes are what the Ollama library page lists for the tag
(https://ollama.com/library/<name>/tags). Capabilities are what the library's template and files
give the model (the library page's badges: tools, thinking, vision, insert via the template's
.Suffix). Columns of `_m`: name, GGUF architecture, parameters (billions), quantization, file size
(GB), layers, embedding length, heads, KV heads, context, vocabulary.
"""

from __future__ import annotations

from launcher.facts.modelspec import ModelSpec, _m

_THINK_TOOLS = ("tools", "thinking")
_TOOLS = ("tools",)
_CODE = ("tools", "insert")


def _qwen3(tag: str, params: float, size: float, layers: int, embd: int, heads: int, **extra: object) -> ModelSpec:
    # Qwen/Qwen3-{0.6B,1.7B,4B,8B,14B,32B}: head_dim 128, 8 KV heads, max_position_embeddings 40960.
    return _m(f"qwen3:{tag}", "qwen3", params, "Q4_K_M", size, layers, embd, heads, 8, 40960, 151936,
              key_length=128, value_length=128, capabilities=_THINK_TOOLS, **extra)  # fmt: skip


TODAY: tuple[ModelSpec, ...] = (
    # qwen3 — https://ollama.com/library/qwen3 ; Qwen/Qwen3-* config.json
    _qwen3("0.6b", 0.752, 0.523, 28, 1024, 16),
    _qwen3("1.7b", 2.03, 1.4, 28, 2048, 16),
    _qwen3("4b", 4.02, 2.5, 36, 2560, 32),
    _qwen3("8b", 8.19, 5.2, 36, 4096, 32, aliases=("qwen3", "qwen3:latest")),
    _qwen3("14b", 14.8, 9.3, 40, 5120, 40),
    _qwen3("32b", 32.8, 20.0, 64, 5120, 64),
    # Qwen/Qwen3-30B-A3B and Qwen3-235B-A22B: 128 experts, 8 per token, 4 KV heads.
    _m("qwen3:30b", "qwen3moe", 30.5, "Q4_K_M", 19.0, 48, 2048, 32, 4, 40960, 151936, key_length=128,
       value_length=128, expert_count=128, expert_used_count=8, active_parameter_count=3_300_000_000,
       capabilities=_THINK_TOOLS, aliases=("qwen3:30b-a3b",)),
    _m("qwen3:235b", "qwen3moe", 235.1, "Q4_K_M", 142.0, 94, 4096, 64, 4, 40960, 151936, key_length=128,
       value_length=128, expert_count=128, expert_used_count=8, active_parameter_count=22_000_000_000,
       capabilities=_THINK_TOOLS, aliases=("qwen3:235b-a22b",)),
    # qwen3-coder — https://ollama.com/library/qwen3-coder ; Qwen/Qwen3-Coder-30B-A3B-Instruct,
    # Qwen/Qwen3-Coder-480B-A35B-Instruct (no thinking; 262144 context).
    _m("qwen3-coder:30b", "qwen3moe", 30.5, "Q4_K_M", 19.0, 48, 2048, 32, 4, 262144, 151936, key_length=128,
       value_length=128, expert_count=128, expert_used_count=8, active_parameter_count=3_300_000_000,
       capabilities=_TOOLS, aliases=("qwen3-coder", "qwen3-coder:latest")),
    _m("qwen3-coder:480b", "qwen3moe", 480.2, "Q4_K_M", 290.0, 62, 6144, 96, 8, 262144, 151936, key_length=128,
       value_length=128, expert_count=160, expert_used_count=8, active_parameter_count=35_000_000_000,
       capabilities=_TOOLS),
    # deepseek-r1 — https://ollama.com/library/deepseek-r1 ; deepseek-ai/DeepSeek-R1-Distill-Qwen-{1.5B,7B,
    # 14B,32B}, DeepSeek-R1-0528-Qwen3-8B (the 8b tag), DeepSeek-R1-Distill-Llama-70B, DeepSeek-R1 (671b:
    # MLA with q/k head 192 = 128 + 64 rope, v head 128; 256 routed experts, 8 per token).
    _m("deepseek-r1:1.5b", "qwen2", 1.78, "Q4_K_M", 1.1, 28, 1536, 12, 2, 131072, 151936, capabilities=("thinking",)),
    _m("deepseek-r1:7b", "qwen2", 7.62, "Q4_K_M", 4.7, 28, 3584, 28, 4, 131072, 152064, capabilities=("thinking",)),
    _m("deepseek-r1:8b", "qwen3", 8.19, "Q4_K_M", 5.2, 36, 4096, 32, 8, 131072, 151936, key_length=128,
       value_length=128, capabilities=_THINK_TOOLS, aliases=("deepseek-r1", "deepseek-r1:latest")),
    _m("deepseek-r1:14b", "qwen2", 14.8, "Q4_K_M", 9.0, 48, 5120, 40, 8, 131072, 152064, capabilities=("thinking",)),
    _m("deepseek-r1:32b", "qwen2", 32.8, "Q4_K_M", 20.0, 64, 5120, 40, 8, 131072, 152064, capabilities=("thinking",)),
    _m("deepseek-r1:70b", "llama", 70.6, "Q4_K_M", 43.0, 80, 8192, 64, 8, 131072, 128256, capabilities=("thinking",)),
    _m("deepseek-r1:671b", "deepseek2", 671.0, "Q4_K_M", 404.0, 61, 7168, 128, 128, 163840, 129280, key_length=192,
       value_length=128, expert_count=256, expert_used_count=8, active_parameter_count=37_000_000_000,
       capabilities=_THINK_TOOLS),
    # gpt-oss — https://ollama.com/library/gpt-oss ; openai/gpt-oss-20b, openai/gpt-oss-120b: head_dim 64,
    # sliding_window 128 on every other layer, 4 experts per token. MXFP4 experts as the library ships them.
    _m("gpt-oss:20b", "gptoss", 20.9, "MXFP4_MOE", 14.0, 24, 2880, 64, 8, 131072, 201088, key_length=64,
       value_length=64, expert_count=32, expert_used_count=4, active_parameter_count=3_600_000_000,
       sliding_window=128, capabilities=_THINK_TOOLS, aliases=("gpt-oss", "gpt-oss:latest")),
    _m("gpt-oss:120b", "gptoss", 116.8, "MXFP4_MOE", 65.0, 36, 2880, 64, 8, 131072, 201088, key_length=64,
       value_length=64, expert_count=128, expert_used_count=4, active_parameter_count=5_100_000_000,
       sliding_window=128, capabilities=_THINK_TOOLS),
    # gemma3:1b — google/gemma-3-1b-it: text only, head_dim 256, sliding_window 512, 32768 context.
    _m("gemma3:1b", "gemma3", 1.0, "Q4_K_M", 0.815, 26, 1152, 4, 1, 32768, 262144, key_length=256,
       value_length=256, sliding_window=512, capabilities=()),
    # llama3.2-vision — https://ollama.com/library/llama3.2-vision ; meta-llama/Llama-3.2-11B-Vision-Instruct,
    # Llama-3.2-90B-Vision-Instruct (text_config: 40 / 100 layers including the cross-attention ones).
    _m("llama3.2-vision:11b", "mllama", 10.7, "Q4_K_M", 7.8, 40, 4096, 32, 8, 131072, 128256,
       capabilities=("vision",), aliases=("llama3.2-vision", "llama3.2-vision:latest")),
    _m("llama3.2-vision:90b", "mllama", 87.7, "Q4_K_M", 55.0, 100, 8192, 64, 8, 131072, 128256,
       capabilities=("vision",)),
    # phi4 — https://ollama.com/library/phi4 ; microsoft/phi-4: 40 layers, 10 KV heads, 16384 context.
    _m("phi4:14b", "phi3", 14.7, "Q4_K_M", 9.1, 40, 5120, 40, 10, 16384, 100352, capabilities=(),
       aliases=("phi4", "phi4:latest")),
    # mistral-small3.1 / 3.2 — https://ollama.com/library/mistral-small3.2 ; mistralai/Mistral-Small-3.2-24B-
    # Instruct-2506 (text_config: 40 layers, 5120, 32 heads, 8 KV, head_dim 128, 131072 context), and the
    # text-only mistral-small:24b (Mistral-Small-24B-Instruct-2501, 32768 context).
    _m("mistral-small3.2:24b", "mistral3", 24.0, "Q4_K_M", 15.0, 40, 5120, 32, 8, 131072, 131072, key_length=128,
       value_length=128, capabilities=("tools", "vision"), aliases=("mistral-small3.2", "mistral-small3.2:latest")),
    _m("mistral-small3.1:24b", "mistral3", 24.0, "Q4_K_M", 15.0, 40, 5120, 32, 8, 131072, 131072, key_length=128,
       value_length=128, capabilities=("tools", "vision"), aliases=("mistral-small3.1", "mistral-small3.1:latest")),
    _m("mistral-small:24b", "llama", 23.6, "Q4_K_M", 14.0, 40, 5120, 32, 8, 32768, 131072, key_length=128,
       value_length=128, capabilities=_TOOLS, aliases=("mistral-small", "mistral-small:latest")),
    # qwen2.5-coder — https://ollama.com/library/qwen2.5-coder ; Qwen/Qwen2.5-Coder-*-Instruct (FIM tokens).
    _m("qwen2.5-coder:0.5b", "qwen2", 0.494, "Q4_K_M", 0.398, 24, 896, 14, 2, 32768, 151936, capabilities=_CODE),
    _m("qwen2.5-coder:1.5b", "qwen2", 1.54, "Q4_K_M", 0.986, 28, 1536, 12, 2, 32768, 151936, capabilities=_CODE),
    _m("qwen2.5-coder:3b", "qwen2", 3.09, "Q4_K_M", 1.9, 36, 2048, 16, 2, 32768, 151936, capabilities=_CODE),
    _m("qwen2.5-coder:7b", "qwen2", 7.62, "Q4_K_M", 4.7, 28, 3584, 28, 4, 32768, 152064, capabilities=_CODE,
       aliases=("qwen2.5-coder", "qwen2.5-coder:latest")),
    _m("qwen2.5-coder:14b", "qwen2", 14.8, "Q4_K_M", 9.0, 48, 5120, 40, 8, 32768, 152064, capabilities=_CODE),
    _m("qwen2.5-coder:32b", "qwen2", 32.8, "Q4_K_M", 20.0, 64, 5120, 40, 8, 32768, 152064, capabilities=_CODE),
    # codellama — https://ollama.com/library/codellama ; meta-llama/CodeLlama-{7b,13b,34b,70b}-hf. The plain
    # tags are the instruct models; the -code tags are the base models with fill-in-middle.
    _m("codellama:7b", "llama", 6.74, "Q4_0", 3.8, 32, 4096, 32, 32, 16384, 32016, capabilities=(),
       aliases=("codellama", "codellama:latest", "codellama:7b-instruct")),
    _m("codellama:7b-code", "llama", 6.74, "Q4_0", 3.8, 32, 4096, 32, 32, 16384, 32016, capabilities=("insert",)),
    _m("codellama:13b", "llama", 13.0, "Q4_0", 7.4, 40, 5120, 40, 40, 16384, 32016, capabilities=(),
       aliases=("codellama:13b-instruct",)),
    _m("codellama:13b-code", "llama", 13.0, "Q4_0", 7.4, 40, 5120, 40, 40, 16384, 32016, capabilities=("insert",)),
    _m("codellama:34b", "llama", 33.7, "Q4_0", 19.0, 48, 8192, 64, 8, 16384, 32000, capabilities=(),
       aliases=("codellama:34b-instruct",)),
    _m("codellama:34b-code", "llama", 33.7, "Q4_0", 19.0, 48, 8192, 64, 8, 16384, 32000, capabilities=("insert",)),
    _m("codellama:70b", "llama", 69.0, "Q4_0", 39.0, 80, 8192, 64, 8, 4096, 32016, capabilities=()),
    # embeddinggemma — https://ollama.com/library/embeddinggemma ; google/embeddinggemma-300m.
    _m("embeddinggemma:300m", "gemma-embedding", 0.307, "BF16", 0.622, 24, 768, 3, 1, 2048, 262144,
       key_length=256, value_length=256, embedding_only=True, capabilities=(),
       aliases=("embeddinggemma", "embeddinggemma:latest")),
    # qwen3-embedding — https://ollama.com/library/qwen3-embedding ; Qwen/Qwen3-Embedding-{0.6B,4B,8B}.
    _m("qwen3-embedding:0.6b", "qwen3", 0.596, "Q8_0", 0.639, 28, 1024, 16, 8, 32768, 151669, key_length=128,
       value_length=128, embedding_only=True, capabilities=()),
    _m("qwen3-embedding:4b", "qwen3", 4.02, "Q4_K_M", 2.5, 36, 2560, 32, 8, 40960, 151665, key_length=128,
       value_length=128, embedding_only=True, capabilities=()),
    _m("qwen3-embedding:8b", "qwen3", 7.57, "Q4_K_M", 4.7, 36, 4096, 32, 8, 40960, 151665, key_length=128,
       value_length=128, embedding_only=True, capabilities=(),
       aliases=("qwen3-embedding", "qwen3-embedding:latest")),
)  # fmt: skip

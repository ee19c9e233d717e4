"""Prompt templates for catalog models that list their capabilities, in Ollama's Go template language.

They are our own short ones. What matters to clients is what Ollama reads from them
(server/images.go goTemplateCapabilities): `.Tools` gives "tools", `.Suffix` gives "insert", and a
`.Thinking` inside `range .Messages` between two text tags (thinking.InferTags: here `<think>` and
`</think>`) gives "thinking". gpt-oss's template is harmony-shaped; its "thinking" comes from the
config's model family (modelFamilyCapabilities), as in Ollama.
"""

from __future__ import annotations

from launcher.facts.catalog import ModelSpec

_SYSTEM_TOOLS = """{{- if or .System .Tools }}<|system|>
{{ if .System }}{{ .System }}{{ end }}
{{- if .Tools }}
Tools you may call:
{{- range .Tools }}
{{ . }}
{{- end }}
{{- end }}<|end|>
{{ end }}"""

_SYSTEM = """{{- if .System }}<|system|>
{{ .System }}<|end|>
{{ end }}"""

_MESSAGES_THINKING = """{{- range $i, $_ := .Messages }}<|{{ .Role }}|>
{{- if and (eq .Role "assistant") .Thinking }}<think>{{ .Thinking }}</think>{{ end }}
{{- if .ToolCalls }}
{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}{{ end }}
{{- else }}
{{ .Content }}
{{- end }}<|end|>
{{ end }}<|assistant|>
{{ if and $.IsThinkSet (not $.Think) }}<think>

</think>
{{ end }}"""

_MESSAGES = """{{- range .Messages }}<|{{ .Role }}|>
{{- if .ToolCalls }}
{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}{{ end }}
{{- else }}
{{ .Content }}
{{- end }}<|end|>
{{ end }}<|assistant|>
"""

_HARMONY = """<|start|>system<|message|>Reasoning: {{ if $.ThinkLevel }}{{ $.ThinkLevel }}{{ else }}medium{{ end }}
{{- if .Tools }}
# Tools
{{- range .Tools }}
{{ . }}
{{- end }}
{{- end }}<|end|>
{{- range .Messages }}<|start|>{{ .Role }}
{{- if .Thinking }}<|channel|>analysis<|message|>{{ .Thinking }}<|end|>{{ end }}
<|message|>{{ .Content }}<|end|>
{{- end }}<|start|>assistant"""

_FIM = "{{- if .Suffix }}<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>{{- else }}"


def template_with_capabilities(spec: ModelSpec) -> str:
    """The template of a catalog model whose entry lists its capabilities."""
    caps = spec.capabilities or ()
    if spec.embedding_only:
        return "{{ .Prompt }}"
    if spec.family == "gptoss":
        return _HARMONY
    system = _SYSTEM_TOOLS if "tools" in caps else _SYSTEM
    body = system + (_MESSAGES_THINKING if "thinking" in caps else _MESSAGES)
    if "insert" in caps:
        # A base code model (codellama:*-code) only completes; an instruct coder also chats.
        chat = body if "tools" in caps else "{{ .Prompt }}"
        return _FIM + chat + "{{- end }}"
    return body


# Catalog entries that predate capability lists: the template follows the family, as before.
_CHAT = _SYSTEM + """
{{- range .Messages }}<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ end }}<|assistant|>
"""
_INSERT = (
    """{{- if .Suffix }}<|prefix|>{{ .Prompt }}<|suffix|>{{ .Suffix }}<|middle|>
{{- else }}"""
    + _SYSTEM_TOOLS
    + _MESSAGES
    + "{{- end }}"
)


def template_for(spec: ModelSpec) -> str:
    """The Go template a simulated pull installs for a catalog model."""
    if spec.capabilities is not None:
        return template_with_capabilities(spec)
    if spec.embedding_only:
        return "{{ .Prompt }}"
    if spec.family == "qwen2":
        return _INSERT
    if spec.family.startswith("gemma"):
        return _CHAT
    return _SYSTEM_TOOLS + _MESSAGES

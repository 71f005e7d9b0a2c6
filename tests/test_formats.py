"""Prompt formats: each one's golden prompt, written here from the format's published layout
(Metharme's model card, Alpaca, ChatML, Meta's Llama 3, Mistral's [INST], FastChat's Vicuna
1.1); models' own Jinja chat templates against what transformers' `apply_chat_template` renders
for the same messages; the token-accurate window in every format; the choice from metadata."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from galatea.chat import formats
from galatea.chat.cards import Character
from galatea.chat.prompt import Turn, build_prompt
from galatea.errors import GalateaError
from galatea.model.checkpoint import embedded_model_path
from galatea.model.gguf_file import GGUFFile
from galatea.model.tokenizer import Tokenizer, _HFTokenizers, bpe_from_gguf
from tests.checkpoints import shared_vocab

CHAR = Character(name="Mira", description="{{char}} is a witch who teaches {{user}} magic.",
                 personality="sly, patient", scenario="{{user}} visits the tower.",
                 mes_example="<START>\n{{user}}: Hi\n{{char}}: Hello, {{user}}.\n*She smiles.*")
HISTORY = [Turn(False, "Welcome, traveller."), Turn(True, "Teach me a spell."), Turn(False, "*nods* Watch.")]
NEW = "Again!"
# the story (SillyTavern's default story string) and the turns, as each format receives them
STORY = "Mira is a witch who teaches Ann magic.\nMira's personality: sly, patient\nScenario: Ann visits the tower."
TURNS = [(True, "Hi"), (False, "Hello, Ann.\n*She smiles.*"), (False, "Welcome, traveller."),
         (True, "Teach me a spell."), (False, "*nods* Watch."), (True, "Again!")]


def expected(name: str) -> str:
    """Each format's prompt for CHAR/HISTORY/NEW, from its published layout."""
    if name == "metharme":  # Pygmalion-2's card: <|system|>...<|user|>...<|model|>..., no separators
        system = "Enter RP mode. Pretend to be Mira whose persona follows:"
        body = "".join(("<|user|>" if u else "<|model|>") + t for u, t in TURNS)
        return f"<|system|>{system}\n{STORY}{body}<|model|>"
    if name == "alpaca":
        system = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                  "request.\n\nWrite Mira's next reply in a fictional roleplay chat between Ann and Mira.")
        body = "".join(("### Instruction:\n" if u else "### Response:\n") + t + "\n\n" for u, t in TURNS)
        return f"{system}\n{STORY}\n\n{body}### Response:\n"
    if name == "chatml":
        def block(role, text):
            return f"<|im_start|>{role}\n{text}<|im_end|>\n"
        body = "".join(block("user" if u else "assistant", t) for u, t in TURNS)
        return block("system", STORY) + body + "<|im_start|>assistant\n"
    if name == "llama3":  # BOS (<|begin_of_text|>) is the tokenizer's to add
        def block(role, text):
            return f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>"
        body = "".join(block("user" if u else "assistant", t) for u, t in TURNS)
        return block("system", STORY) + body + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    if name == "mistral":  # no system role: the story opens the first [INST]; one reply per [INST]
        return (f"[INST] {STORY}\n\nHi [/INST]Hello, Ann.\n*She smiles.*\n\nWelcome, traveller.</s>"
                "[INST] Teach me a spell. [/INST]*nods* Watch.</s>[INST] Again! [/INST]")
    if name == "vicuna":  # FastChat vicuna_v1.1: system, then "USER: x ASSISTANT: y</s>"
        system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the user's questions.")
        body = "".join(f"USER: {t} " if u else f"ASSISTANT: {t}</s>" for u, t in TURNS)
        return f"{system}\n{STORY} {body}ASSISTANT:"
    raise AssertionError(name)


INSTRUCT = ["metharme", "alpaca", "chatml", "llama3", "mistral", "vicuna"]


@pytest.mark.parametrize("name", INSTRUCT)
def test_golden_prompt_per_format(name, llama_tok):
    p = build_prompt(CHAR, HISTORY, NEW, llama_tok, 2048, 128, user="Ann", fmt=formats.named(name))
    assert p.text == expected(name)
    assert p.format == name and p.stops == list(formats.named(name).stops)
    assert p.tokens == len(llama_tok.encode(p.text))


def test_ends_for_impersonation_and_continuation(llama_tok):
    fmt = formats.named("chatml")
    user = build_prompt(CHAR, HISTORY, None, llama_tok, 2048, 128, user="Ann", fmt=fmt, end="user")
    assert user.text.endswith("<|im_start|>assistant\n*nods* Watch.<|im_end|>\n<|im_start|>user\n")
    more = build_prompt(CHAR, HISTORY, None, llama_tok, 2048, 128, user="Ann", fmt=fmt, end="continue")
    assert more.text.endswith("<|im_start|>assistant\n*nods* Watch.")


def test_a_card_system_prompt_replaces_the_formats(llama_tok):
    char = Character(name="Mira", description="A witch.", system_prompt="Stay in character. {{original}}")
    p = build_prompt(char, [], "Hi", llama_tok, 2048, 128, fmt=formats.named("metharme"))
    assert p.text == ("<|system|>Stay in character. Enter RP mode. Pretend to be Mira whose persona follows:\n"
                      "A witch.<|user|>Hi<|model|>")


# ---- the model's own chat template, against transformers -----------------------------------------

LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's tokenizer_config.json
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL_TEMPLATE = (  # Mistral-7B-Instruct-v0.1's: no system role, strict alternation
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")


def transformers_render(template: str, tok: Tokenizer, messages: list[dict], generation: bool = True,
                        **kwargs) -> str:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=bpe_from_gguf(GGUFFile(embedded_model_path()).metadata),
                                 bos_token=tok.piece(tok.bos_id), eos_token=tok.piece(tok.eos_id))
    return hf.apply_chat_template(messages, chat_template=template, tokenize=False,
                                  add_generation_prompt=generation, **kwargs)


def with_template(tok: Tokenizer, template: str, bos: str = "<s>", eos: str = "</s>") -> Tokenizer:
    """The embedded model's tokenizer carrying another template and BOS/EOS spellings."""
    backend = _HFTokenizers(bpe_from_gguf(GGUFFile(embedded_model_path()).metadata))
    backend.tk.add_special_tokens([bos, eos])
    return Tokenizer(backend, "bpe", tok.vocab_size, backend.tk.token_to_id(bos), backend.tk.token_to_id(eos),
                     add_bos=False, chat_template=template)


def hf_messages(turns, story: str | None = STORY) -> list[dict]:
    system = [{"role": "system", "content": story}] if story else []
    return system + [{"role": "user" if u else "assistant", "content": t} for u, t in turns]


def test_the_embedded_models_template_equals_transformers(smol_tok):
    fmt = formats.choose("auto", smol_tok)
    assert fmt.kind == "template" and fmt.stops == ("<|im_end|>",)
    p = build_prompt(CHAR, HISTORY, NEW, smol_tok, 2048, 128, user="Ann", fmt=fmt)
    assert p.text == transformers_render(smol_tok.chat_template, smol_tok, hf_messages(TURNS))


def test_llama3_template_equals_transformers_without_the_bos_the_tokenizer_adds(smol_tok):
    tok = with_template(smol_tok, LLAMA3_TEMPLATE, bos="<|begin_of_text|>", eos="<|eot_id|>")
    p = build_prompt(CHAR, HISTORY, NEW, tok, 2048, 128, user="Ann", fmt=formats.choose("template", tok))
    assert p.text == transformers_render(LLAMA3_TEMPLATE, tok, hf_messages(TURNS))  # the tokenizer adds no BOS
    tok.add_bos = True
    p = build_prompt(CHAR, HISTORY, NEW, tok, 2048, 128, user="Ann", fmt=formats.choose("template", tok))
    assert "<|begin_of_text|>" + p.text == transformers_render(LLAMA3_TEMPLATE, tok, hf_messages(TURNS))
    assert p.stops == ["<|eot_id|>"]


def test_a_template_without_system_role_gets_the_story_in_the_first_user_turn(smol_tok):
    """Mistral's template refuses a system message and non-alternating turns: the story becomes
    the first user turn (the chat opens with the greeting), runs of one side are joined."""
    tok = with_template(smol_tok, MISTRAL_TEMPLATE)
    p = build_prompt(CHAR, HISTORY, NEW, tok, 2048, 128, user="Ann", fmt=formats.choose("template", tok))
    folded = [(True, f"{STORY}\n\nHi"), (False, "Hello, Ann.\n*She smiles.*\n\nWelcome, traveller."),
              (True, "Teach me a spell."), (False, "*nods* Watch."), (True, "Again!")]
    assert p.text == transformers_render(MISTRAL_TEMPLATE, tok, hf_messages(folded, None), generation=False)
    assert p.stops == ["</s>"]


TEMPLATES = Path(__file__).parent / "data" / "templates"


@pytest.mark.parametrize("family, bos, eos", [("gemma-2", "<bos>", "<eos>"), ("gemma-3", "<bos>", "<eos>"),
                                              ("qwen3", "<|endoftext|>", "<|im_end|>")])
def test_the_families_templates_equal_transformers(family, bos, eos, smol_tok):
    """Gemma 2 (refuses a system role: the story opens the first user turn), Gemma 3 (takes the
    system prompt into the first user turn itself) and Qwen3 (thinking off in chat: its template
    gets enable_thinking false and writes an empty <think> block; on: none)."""
    template = (TEMPLATES / f"{family}.jinja").read_text()
    tok = with_template(smol_tok, template, bos=bos, eos=eos)
    fmt = formats.choose("template", tok)
    p = build_prompt(CHAR, HISTORY, NEW, tok, 2048, 128, user="Ann", fmt=fmt)
    turns = TURNS if family != "gemma-2" else [(True, f"{STORY}\n\nHi"), *TURNS[1:]]
    kwargs = {"enable_thinking": False} if family == "qwen3" else {}
    story = None if family == "gemma-2" else STORY
    messages = hf_messages(_alternating_turns(turns) if family.startswith("gemma") else turns, story)
    assert p.text == transformers_render(template, tok, messages, **kwargs)
    if family == "qwen3":
        assert p.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        on = build_prompt(CHAR, HISTORY, NEW, tok, 2048, 128, user="Ann", fmt=replace(fmt, thinking=True))
        assert on.text == transformers_render(template, tok, messages, enable_thinking=True)
        assert on.text.endswith("<|im_start|>assistant\n")
    assert p.stops == (["<|im_end|>"] if family == "qwen3" else ["<end_of_turn>", "<eos>"])


def _alternating_turns(turns):
    out = []
    for is_user, text in turns:
        if out and out[-1][0] == is_user:
            out[-1] = (is_user, f"{out[-1][1]}\n\n{text}")
        else:
            out.append((is_user, text))
    return out


def test_templates_run_sandboxed(smol_tok):
    for hostile in ("{{ ().__class__.__base__.__subclasses__() }}", "{{ messages.append(1) }}",
                    "{% for m in messages %}{{ m.content.__class__.__mro__ }}{% endfor %}"):
        tok = with_template(smol_tok, hostile)
        with pytest.raises(GalateaError, match=r"chat template refuses this chat .*unsafe"):
            build_prompt(CHAR, HISTORY, NEW, tok, 2048, 128, fmt=formats.choose("template", tok))
    with pytest.raises(GalateaError, match="not valid Jinja"):
        formats.choose("template", with_template(smol_tok, "{% for %}"))


# ---- the window, in every format -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pygmalion", *INSTRUCT, "template"])
def test_window_fits_exactly_in_every_format(name, llama_tok, smol_tok):
    """Long chats: the prompt fits the context minus the reply, counted with the model's tokenizer
    on the text with every wrapper, and one more of the dropped messages would not fit."""
    tok = smol_tok if name == "template" else llama_tok
    fmt = formats.choose(name, tok)
    char = Character(name="Mira", description="A witch of the northern tower. " * 4, scenario="The tower.")
    history = [Turn(i % 2 == 1, f"Message {i}: " + "the wind howls over the tower " * (1 + i % 3)) for i in range(60)]
    context, reply = 700, 120
    p = build_prompt(char, history, NEW, tok, context, reply, fmt=fmt)
    assert p.messages_dropped > 0
    assert p.tokens == len(tok.encode(p.text)) <= context - reply
    more = build_prompt(char, history[p.messages_dropped - 1:], NEW, tok, 100_000, reply, fmt=fmt)
    assert more.messages_dropped == 0 and more.tokens > context - reply


# ---- choosing -------------------------------------------------------------------------------------

def test_auto_follows_the_model(llama_tok, smol_tok):
    assert formats.choose("auto", llama_tok).name == "pygmalion"  # Pygmalion 7B's vocabulary, no template
    assert formats.choose(None, smol_tok).name == "template"
    metharme = with_template(smol_tok, "")
    metharme.chat_template = None
    metharme._backend.tk.add_special_tokens(["<|system|>", "<|user|>", "<|model|>"])
    assert formats.choose("auto", metharme).name == "metharme"
    with pytest.raises(GalateaError, match="no chat template"):
        formats.choose("template", llama_tok)
    with pytest.raises(GalateaError, match="unknown prompt format 'chatgpt'"):
        formats.choose("chatgpt", llama_tok)


def test_formats_are_data():
    """Every format in the file is complete: wrappers, stops, a title."""
    from importlib import resources

    data = json.loads(resources.files("galatea.chat").joinpath("formats.json").read_text())
    for name in formats.names():
        fmt = formats.named(name)
        assert fmt.title and data[name]["kind"] == fmt.kind
        if fmt.kind == "instruct":
            assert fmt.stops and fmt.input_sequence


# ---- serving ------------------------------------------------------------------------------------

def test_serve_format_sets_chat_completions_and_the_page_default(tmp_path_factory, llama_tok, smol_tok):
    """`serve --format pygmalion`: OpenAI chat completions are built in Pygmalion's layout (counted
    with the model's tokenizer), chats set to auto follow it, the Kobold routes stay raw text."""
    from tests.helpers import post, running_server

    server = next(gen := running_server(tmp_path_factory, "--format", "pygmalion"))
    try:
        messages = [{"role": "system", "content": "Aria is a cheerful bard."},
                    {"role": "assistant", "name": "Aria", "content": "Hello, traveller!"},
                    {"role": "user", "content": "Hi!"}]
        r = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 2, "temperature": 0}).json()
        text = "Aria's Persona: Aria is a cheerful bard.\n<START>\nAria: Hello, traveller!\nYou: Hi!\nAria:"
        assert r["usage"]["prompt_tokens"] == len(smol_tok.encode(text))
        listed = httpx_get(server, "/galatea/formats")
        assert listed["auto"].startswith("Pygmalion") and {"auto", "template", "metharme"} <= \
            {f["name"] for f in listed["formats"]}
        k = post(server, "/api/v1/generate", {"prompt": "Once upon a time", "max_length": 1}).json()
        assert k["results"][0]["text"] is not None
        aria = httpx_get(server, "/galatea/characters")[0]["id"]
        chat = post(server, f"/galatea/characters/{aria}/chats", {}).json()
        prompt = httpx_get(server, f"/galatea/chats/{chat['id']}/prompt")
        assert prompt["prompt"].startswith("Aria's Persona:") and prompt["format"] == "pygmalion"
        bad = httpx_put(server, f"/galatea/chats/{chat['id']}/settings", {"format": "gpt"})
        assert bad.status_code == 400 and "not a prompt format" in bad.text
        assert httpx_put(server, f"/galatea/chats/{chat['id']}/settings", {"format": "chatml"}).status_code == 200
        assert httpx_get(server, f"/galatea/chats/{chat['id']}/prompt")["prompt"].startswith("<|im_start|>system\n")
    finally:
        next(gen, None)


def httpx_get(server, path):
    import httpx

    return httpx.get(f"{server.url}{path}", timeout=30).json()


def httpx_put(server, path, body):
    import httpx

    return httpx.put(f"{server.url}{path}", json=body, timeout=30)


def test_prompt_command_takes_a_format(capsys):
    from galatea.cli import main

    assert main(["prompt", "--model", str(shared_vocab()), "--format", "metharme", "--message", "Hi"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("<|system|>Enter RP mode. Pretend to be Aria whose persona follows:\nAria is")
    assert out.rstrip("\n").endswith("<|user|>Hi<|model|>")
    assert main(["prompt", "--model", str(shared_vocab()), "--format", "gpt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: --format gpt: not a prompt format; use one of auto, template, pygmalion, metharme, "
                       "alpaca, chatml, llama3, mistral, vicuna")

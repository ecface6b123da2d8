"""``peftc serve``: the OpenAI-compatible server on 127.0.0.1, talked to with the official ``openai`` client.
Greedy completions (plain, streamed, chat, sixteen at once through continuous batching) equal each prompt
decoded alone: by peftc's cached decoding loop in ONNX Runtime on the base's ``--genai`` export, and, for the
adapters of a bank (LoRA, IA3, a soft prompt, a prefix: rows of different prefix lengths in one batch), by
``peftc generate``'s decoder on each adapter's own compiled model. Bad requests get OpenAI's error JSON with
a 4xx status; SIGTERM lets a running stream finish and the command exits 0.

The model is tiny-llama; its export carries a tokenizer of one character per id (every id of the 512-token
vocabulary a distinct character, with a chat template), so a text compares token for token. Every test but
the one of command errors needs that export (11 s once), so they are marked slow."""
import contextlib
import functools
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import peftc
from conftest import randomize_adapters
from peftc.cli import main
from peftc.cli.serve import listen, uvicorn_server
from peftc.export.genai import OnnxStep, decode
from peftc.rundir import write_compiled
from peftc.serve.engine import BASE, BaseEngine
from peftc.serve.scheduler import Delta, Done, Failed, Request, Scheduler
from peftc.serve.server import bank_engine, create_app, open_service
from peftc.training.generate import RecomputeDecoder, greedy, torch_logits

EOS = 2
PROMPTS = ["hello", "the cat sat on the mat", "a", "1 2 3 4 5 6 7 8 9", "why?", "serve many tasks at once"]
CHAT = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
       "{% if add_generation_prompt %}assistant:{% endif %}"
#: the bank's adapters: rows with no starting cache (LoRA, IA3) and with one of 3 and 2 positions
SPECS = {"lora": "lora q, v r=4", "ia3": "ia3 k, v, down", "prompt": "prompt tokens=3", "prefix": "prefix tokens=2"}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """<pad> <s> </s>, then printable ASCII, newline and CJK characters up to 512 ids, one character each."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    chars += [chr(0x4E00 + i) for i in range(512 - 3 - len(chars))]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<pad>", clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT
    return fast


@pytest.fixture(scope="module", autouse=True)
def torch_on_one_thread():
    """Tiny models run fastest on one torch thread; beside ONNX Runtime's threads two are far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def genai(tmp_path_factory):
    """tiny-llama's KV-cache export (no adapter), with the character tokenizer beside it."""
    out = tmp_path_factory.mktemp("serve") / "genai"
    peftc.export_genai(peftc.compile("tiny-llama", "", seed=0).merge(), out)
    char_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(genai):
    return AutoTokenizer.from_pretrained(genai)


@contextlib.contextmanager
def serving(service):
    """The app on uvicorn on a free port of 127.0.0.1, in a thread; yields an ``openai`` client for it."""
    server = uvicorn_server(create_app(service), grace=5)
    sock = listen("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="unused",
                            max_retries=0, timeout=60)
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def client(genai):
    """The base alone, at most 4 rows a step: sixteen requests must join and leave the batch."""
    with serving(open_service(genai, max_batch=4, queue=64, timeout=60)) as c:
        yield c


@functools.lru_cache(maxsize=None)
def onnx_step(path) -> OnnxStep:
    return OnnxStep(path)


def alone(genai, ids: list[int], new: int) -> list[int]:
    """The oracle: ``ids`` decoded alone, greedy with the cache, by peftc's ONNX Runtime loop; up to eos."""
    tokens, _ = decode(onnx_step(genai / "model.onnx"), np.array([ids]), np.ones((1, len(ids)), np.int64), new,
                       eos_id=EOS)
    tokens = tokens[0].tolist()
    return tokens[:tokens.index(EOS)] if EOS in tokens else tokens


def expected_text(genai, tokenizer, ids: list[int], new: int) -> tuple[str, int]:
    tokens = alone(genai, ids, new)
    return tokenizer.decode(tokens, skip_special_tokens=True), len(tokens)


def streamed(chunks, chat: bool = False) -> tuple[str, str | None]:
    text, reason = "", None
    for chunk in chunks:
        for choice in chunk.choices:
            text += (choice.delta.content or "") if chat else choice.text
            reason = choice.finish_reason or reason
    return text, reason


@pytest.mark.slow
def test_models_are_listed(client):
    assert [m.id for m in client.models.list()] == ["tiny-llama"]
    assert client.models.retrieve(BASE).id == BASE
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("nope")


@pytest.mark.slow
def test_greedy_completions_equal_each_prompt_decoded_alone(client, genai, tokenizer):
    """Plain and streamed, under the base's name and as __base__; usage counts the prompt's and the new tokens."""
    for i, prompt in enumerate(PROMPTS[:4]):
        ids = tokenizer(prompt)["input_ids"]
        text, n = expected_text(genai, tokenizer, ids, 12)
        out = client.completions.create(model="tiny-llama" if i % 2 else BASE, prompt=prompt, max_tokens=12,
                                        temperature=0)
        assert out.choices[0].text == text
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), n)
        assert out.choices[0].finish_reason == ("length" if n == 12 else "stop")
        chunks = list(client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert streamed(chunks) == (text, out.choices[0].finish_reason)
        assert chunks[-1].usage.completion_tokens == n


@pytest.mark.slow
def test_chat_completions_use_the_tokenizers_template(client, genai, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    text, n = expected_text(genai, tokenizer, list(ids), 10)
    out = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == text
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), n)
    chunks = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=10, temperature=0,
                                            stream=True)
    assert streamed(chunks, chat=True)[0] == text


@pytest.mark.slow
def test_sixteen_concurrent_requests_are_each_decoded_as_alone(client, genai, tokenizer):
    """16 threads, prompts of 2 to 25 tokens, 3 to 18 new tokens, half streamed, 4 rows a step at most."""
    jobs = [(PROMPTS[i % len(PROMPTS)] + " x" * (i % 3), 3 + i, i % 2 == 1) for i in range(16)]

    def ask(job):
        prompt, new, stream = job
        out = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=new, temperature=0,
                                        stream=stream)
        return streamed(out)[0] if stream else out.choices[0].text
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, jobs))
    assert got == [expected_text(genai, tokenizer, tokenizer(p)["input_ids"], n)[0] for p, n, _ in jobs]


@pytest.mark.slow
def test_a_stop_string_ends_the_text_before_it(client, genai, tokenizer):
    ids = tokenizer(PROMPTS[1])["input_ids"]
    full, _ = expected_text(genai, tokenizer, ids, 20)
    stop = full[6:8]
    assert len(stop) == 2
    for stream in (False, True):
        out = client.completions.create(model="tiny-llama", prompt=PROMPTS[1], max_tokens=20, temperature=0,
                                        stop=[stop, "never seen"], stream=stream)
        text, reason = streamed(out) if stream else (out.choices[0].text, out.choices[0].finish_reason)
        assert (text, reason) == (full[:full.index(stop)], "stop")


@pytest.mark.slow
def test_sampling_follows_seed_and_top_p(client, genai, tokenizer):
    """A seeded request gives the same text alone and beside others; a nucleus of one token is greedy."""
    def ask(seed, **kw):
        return client.completions.create(model="tiny-llama", prompt="hello", max_tokens=16, seed=seed,
                                         **{"temperature": 1.5, **kw}).choices[0].text
    first = ask(7)
    with ThreadPoolExecutor(4) as pool:
        again = list(pool.map(lambda s: ask(s), [7, 8, 9, 7]))
    assert again[0] == again[3] == first
    assert len({first, again[1], again[2]}) > 1
    greedy_text, _ = expected_text(genai, tokenizer, tokenizer("hello")["input_ids"], 16)
    assert ask(3, top_p=1e-9) == greedy_text


def _post(base_url: str, path: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(base_url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_bad_requests_get_openai_errors(client):
    url = str(client.base_url).rstrip("/")
    status, body = _post(url, "/completions", b'{"model": "tiny-llama", "prompt": ')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _post(url, "/nowhere", b"{}")
    assert status == 404 and body["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="'nope' does not exist") as exc:
        client.completions.create(model="nope", prompt="hello")
    assert exc.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512 tokens") as exc:
        client.completions.create(model="tiny-llama", prompt="hello", max_tokens=600)
    assert exc.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match=r"requested 601 tokens \(600 in the prompt"):
        client.completions.create(model="tiny-llama", prompt="x" * 599, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="'temperature' is 5") as exc:
        client.completions.create(model="tiny-llama", prompt="hello", temperature=5)
    assert exc.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="'n' must be 1"):
        client.completions.create(model="tiny-llama", prompt="hello", n=2)
    with pytest.raises(openai.BadRequestError, match="'messages' must be a non-empty list"):
        client.chat.completions.create(model="tiny-llama", messages=[])
    with pytest.raises(openai.BadRequestError, match="token ids must be a non-empty list of integers in"):
        client.completions.create(model="tiny-llama", prompt=[5, 600])


@pytest.mark.slow
def test_a_full_queue_answers_429(genai):
    with serving(open_service(genai, queue=0)) as c:
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            c.completions.create(model="tiny-llama", prompt="hello", max_tokens=2)


class Recording(BaseEngine):
    """The base engine, recording the batch size of every step."""
    sizes: list

    def __call__(self, ids, mask, past, task_ids):
        self.sizes.append(ids.shape[0])
        return super().__call__(ids, mask, past, task_ids)


def _collector():
    events, done = [], threading.Event()

    def emit(event):
        events.append(event)
        if not isinstance(event, Delta):
            done.set()
    return events, done, emit


@pytest.mark.slow
def test_a_request_joins_a_running_batch_and_one_past_its_timeout_fails(genai, tokenizer):
    """The second request joins while the first decodes (steps of two rows, then of one when it has left), and
    both give their tokens alone; a cancelled request leaves the batch without finishing its 400 tokens; a
    request past its deadline fails with 504 before it is decoded."""
    engine = Recording(OnnxStep(genai / "model.onnx"), 512)
    engine.sizes = []
    scheduler = Scheduler(engine, lambda ids: tokenizer.decode(ids, skip_special_tokens=True), [EOS])
    scheduler.start()
    first, second = tokenizer(PROMPTS[1])["input_ids"], tokenizer(PROMPTS[0])["input_ids"]
    events1, done1, emit1 = _collector()
    events2, done2, emit2 = _collector()
    scheduler.submit(Request(BASE, first, 40, emit1, temperature=0))
    while not events1:
        time.sleep(0.001)
    scheduler.submit(Request(BASE, second, 5, emit2, temperature=0))
    assert done1.wait(30) and done2.wait(30)
    cancelled_events, _, emit = _collector()
    cancelled = Request(BASE, first, 400, emit, temperature=0)
    scheduler.submit(cancelled)
    while not cancelled_events:
        time.sleep(0.001)
    cancelled.cancel()
    deadline = time.monotonic() + 30
    while scheduler.busy and time.monotonic() < deadline:
        time.sleep(0.001)
    assert scheduler.busy == 0 and not any(isinstance(e, Done) for e in cancelled_events)
    scheduler.timeout = 1e-9
    events3, done3, emit3 = _collector()
    scheduler.submit(Request(BASE, second, 5, emit3, temperature=0))
    assert done3.wait(30)
    scheduler.close()
    for events, ids, new in ((events1, first, 40), (events2, second, 5)):
        assert "".join(e.text for e in events if isinstance(e, Delta)) == \
            tokenizer.decode(alone(genai, ids, new), skip_special_tokens=True)
        assert isinstance(events[-1], Done)
    joined = engine.sizes.index(2)
    assert joined > 1 and 1 in engine.sizes[joined:]
    assert isinstance(events3[-1], Failed) and events3[-1].error.status == 504


@pytest.fixture(scope="module")
def bank(genai, tmp_path_factory):
    """Four adapters of tiny-llama written as 'peftc compile' writes them (random non-zero weights), served
    with the base by one ONNX mixed-task decoder, as ``peftc serve OUT --adapter NAME=DIR ...`` loads it."""
    root = tmp_path_factory.mktemp("adapters")
    base = peftc.load_model("tiny-llama")
    dirs, compiled = {}, {}
    for i, (name, spec) in enumerate(SPECS.items()):
        model = peftc.compile(base, spec, seed=0)
        randomize_adapters(model, seed=i + 1, scale=1.0 if name in ("prompt", "prefix") else 0.3)
        write_compiled(root / name, model, model.spec, "tiny-llama", model.report())
        dirs[name], compiled[name] = root / name, model
    engine = bank_engine(genai, dirs, use_torch=False, workdir=root / "work")
    return open_service(genai, engine, max_batch=4), compiled, root / "work" / "bank"


@pytest.mark.slow
def test_adapters_each_complete_as_their_own_model(bank, tokenizer):
    """16 concurrent requests over the 4 adapters (two prompts each, 3 to 7 new tokens): each text is what
    ``peftc generate RUN --recompute`` gives with that adapter's own compiled model alone (greedy, the whole
    sequence re-run each step, no cache). The bank's directory itself serves the same names."""
    service, compiled, bank_dir = bank
    jobs = [(list(SPECS)[i % 4], PROMPTS[i // 4 % 2], 3 + i % 5) for i in range(16)]
    with serving(service) as c:
        assert [m.id for m in c.models.list()] == ["tiny-llama", *SPECS]

        def ask(job):
            name, prompt, new = job
            return c.completions.create(model=name, prompt=prompt, max_tokens=new, temperature=0).choices[0].text
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(ask, jobs))
    longest = {}
    for name, prompt, new in jobs:
        longest[name, prompt] = max(new, longest.get((name, prompt), 0))
    tokens = {(name, prompt): greedy(RecomputeDecoder(torch_logits(compiled[name].eval())),
                                     [tokenizer(prompt)["input_ids"]], eos_id=EOS, max_new_tokens=new)[0]
              for (name, prompt), new in longest.items()}
    for (name, prompt, new), text in zip(jobs, got):        # greedy: fewer new tokens are the first of more
        assert text == tokenizer.decode(tokens[name, prompt][:new], skip_special_tokens=True), (name, prompt, new)
    assert open_service(bank_dir).names() == ["tiny-llama", *SPECS]


@pytest.mark.slow
def test_the_command_serves_and_exits_0_on_sigterm(genai, tokenizer):
    """``peftc serve OUT --port 0`` prints its URL; a stream running when SIGTERM comes finishes whole, then the
    command exits 0 without a traceback. Bad arguments are one line."""
    proc = subprocess.Popen([sys.executable, "-m", "peftc.cli", "serve", str(genai), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"at (http://127\.0\.0\.1:\d+/v1)", line)
        assert url, line + proc.stderr.read()
        c = openai.OpenAI(base_url=url.group(1), api_key="unused", max_retries=0)
        chunks = c.completions.create(model="tiny-llama", prompt="hello", max_tokens=400, temperature=0,
                                      stream=True)
        first = next(iter(chunks))
        proc.send_signal(signal.SIGTERM)
        text, reason = streamed([first, *chunks])
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    expected, _ = expected_text(genai, tokenizer, tokenizer("hello")["input_ids"], 400)
    assert text == expected
    assert "Traceback" not in proc.stderr.read()


def test_command_errors_are_one_line(tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--port", "0"]) == 1
    assert "is not a 'peftc export --genai' directory" in capsys.readouterr().err
    (tmp_path / "peftc.json").write_text('{"model": "tiny-llama"}')        # what an export names
    assert main(["serve", str(tmp_path), "--adapter", "tiny-llama=" + str(tmp_path)]) == 1
    assert "taken by the base model" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--adapter", "nameless"]) == 1
    err = capsys.readouterr().err
    assert "expected NAME=DIR" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_torch_flag_serves_the_compiled_model(genai, tokenizer):
    """``--torch``: the torch KV-cache decoder of the model the export names gives the export's tokens."""
    with serving(open_service(genai, use_torch=True)) as c:
        for prompt in PROMPTS[:2]:
            out = c.completions.create(model="tiny-llama", prompt=prompt, max_tokens=8, temperature=0)
            assert out.choices[0].text == expected_text(genai, tokenizer, tokenizer(prompt)["input_ids"], 8)[0]

"""`ascend-patch ab --servers`: URLs, workload, streaming client and figures, against fake
OpenAI-compatible servers on 127.0.0.1 (the real ones are in tests/e2e/test_ab_servers.py)."""

import argparse
import io
import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from rich.console import Console

from ascend_patch.ab import servers
from ascend_patch.ab.servers import ServerFailed, make_workload
from ascend_patch.cli.ab import parse_url
from ascend_patch.cli.main import main
from ascend_patch.harness.server import ManagedServer


@pytest.mark.parametrize(("text", "base"), [
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
    ("http://127.0.0.1:8000/", "http://127.0.0.1:8000"),
    ("https://llm.example.com/v1/", "https://llm.example.com"),
    ("http://10.0.0.5:9000/team-a/v1", "http://10.0.0.5:9000/team-a"),
])
def test_server_urls_are_normalised_to_their_base(text, base):
    assert parse_url(text) == base


@pytest.mark.parametrize(("text", "message"), [
    ("localhost:8000", "'localhost:8000' is not an http(s) URL (e.g. http://127.0.0.1:8000)"),
    ("ftp://127.0.0.1", "'ftp://127.0.0.1' is not an http(s) URL (e.g. http://127.0.0.1:8000)"),
    ("http://", "'http://' is not an http(s) URL (e.g. http://127.0.0.1:8000)"),
    ("http://h:99999", "'http://h:99999' is not an http(s) URL (e.g. http://127.0.0.1:8000)"),
    ("http://h/v1?key=1", "'http://h/v1?key=1': give the server's base URL, without ?query or "
                          "#fragment"),
])
def test_bad_server_urls_are_refused(text, message):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        parse_url(text)
    assert str(info.value) == message


def usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture
def no_server(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a server was started or contacted")

    monkeypatch.setattr(ManagedServer, "start", refuse)
    monkeypatch.setattr(servers, "get_json", refuse)
    monkeypatch.setattr(servers, "stream_completion", refuse)


def test_bad_live_arguments_exit_2_naming_the_argument(capsys, no_server, tmp_path):
    url = "http://127.0.0.1:9"
    config = tmp_path / "c.yaml"
    config.write_text("version: 1\npatches: []\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    numbers = tmp_path / "numbers.json"
    numbers.write_text("[1, 2]")
    out = tmp_path / "out"
    cases = [
        (["--servers", "not-a-url", url], "argument --servers: 'not-a-url' is not an http(s) URL "
                                          "(e.g. http://127.0.0.1:8000)"),
        (["--servers", url], "argument --servers: give at least two servers to compare"),
        (["--servers", url, url, "--stock"], "argument --stock: with --launch name 'stock' as a "
                                             "config; with --servers start it yourself"),
        (["--servers", url, url, "--server-reports", "-"],
         "argument --server-reports: 1 folders for 2 servers (use '-' for a server without one)"),
        (["--servers", url, url, "--server-reports", "-", str(tmp_path / "no")],
         f"argument --server-reports: {tmp_path / 'no'} is not a folder"),
        (["--servers", url, url, "--launch", str(config), "stock"],
         "give one of CONFIG (with --ratios), --arms, --servers or --launch, not --servers and "
         "--launch"),
        (["--launch", str(config), "stock"], "argument --model: --launch needs the model to serve"),
        (["--launch", str(config), "stok", "--model", str(tmp_path)],
         "argument --launch: stok is neither a file nor 'stock'"),
        (["--servers", url, url, "--requests", "0"],
         "argument --requests: 0 is out of range (1 to 10000)"),
        (["--servers", url, url, "--concurrency", "0"],
         "argument --concurrency: 0 is out of range (1 to 1024)"),
        (["--servers", url, url, "--repeats", "0"],
         "argument --repeats: 0 is out of range (1 to 1000)"),
        (["--servers", url, url, "--prompts", str(empty)],
         f"argument --prompts: {empty}: no prompts in it"),
        (["--servers", url, url, "--prompts", str(numbers)],
         f"argument --prompts: {numbers}: a JSON prompts file must be a list of non-empty strings"),
        (["--servers", url, url, "--prompts", str(tmp_path / "none.txt")],
         f"argument --prompts: cannot read {tmp_path / 'none.txt'}: [Errno 2] No such file or "
         f"directory: '{tmp_path / 'none.txt'}'"),
        (["--one-at-a-time", "--servers", url, url],
         "argument --one-at-a-time: goes with --launch"),
    ]
    for args, message in cases:
        assert usage_error(capsys, ["ab", *args, "--out", str(out)]) == (
            f"ascend-patch ab: error: {message}"), args
    assert not out.exists()


def test_generated_workload_mixes_lengths_and_a_file_cycles():
    work = make_workload(6, 40, 16, seed=3)
    assert work == make_workload(6, 40, 16, seed=3)
    assert all(10 <= len(r.prompt.split()) <= 40 and 4 <= r.max_tokens <= 16 for r in work)
    assert len({len(r.prompt.split()) for r in work}) > 1
    from_file = make_workload(3, 40, 16, seed=3, prompts=["a", "b"], offset=3)
    assert [r.prompt for r in from_file] == ["b", "a", "b"]


# ---------------------------------------------------------------- fake servers


class FakeOpenAI:
    """A streaming /v1/completions that answers `tokens` (one word each) after `first_s`, then
    one per `step_s`; records every path it is asked for."""

    def __init__(self, step_s: float, first_s: float = 0.02, redirect_to: str | None = None,
                 word: str = " w1", prompt_logprob: float | None = -0.25):
        """An echoed completion (the held-out NLL) answers one token per word of the prompt,
        each with `prompt_logprob` (None: a server that does not echo logprobs)."""
        self.paths: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                owner.paths.append(self.path)
                if redirect_to:
                    self.send_response(302)
                    self.send_header("Location", redirect_to + self.path)
                    self.end_headers()
                    return
                body = {"/v1/models": {"data": [{"id": "tiny"}]},
                        "/version": {"version": "fake-1"}}.get(self.path)
                self.send_response(200 if body else 404)
                self.end_headers()
                self.wfile.write(json.dumps(body or {}).encode())

            def do_POST(self):
                owner.paths.append(self.path)
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if request.get("echo"):
                    self.echo(request)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                time.sleep(first_s)
                for i in range(request["max_tokens"]):
                    if i:
                        time.sleep(step_s)
                    chunk = {"choices": [{"text": word, "logprobs": {
                        "tokens": [word], "token_logprobs": [-0.25]}}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                usage = {"choices": [], "usage": {"prompt_tokens": 5,
                                                  "completion_tokens": request["max_tokens"]}}
                self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())

            def echo(self, request):
                if prompt_logprob is None:
                    self.send_response(400)
                    self.end_headers()
                    self.wfile.write(b'{"error": "echo is not supported"}')
                    return
                words = len(request["prompt"].split())
                logprobs = [None] + [prompt_logprob] * (words - 1) + [-0.5]  # + 1 generated
                body = {"choices": [{"text": request["prompt"] + word,
                                     "logprobs": {"token_logprobs": logprobs}}],
                        "usage": {"prompt_tokens": words, "completion_tokens": 1}}
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps(body).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @contextmanager
    def running(self):
        thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.httpd.shutdown()
            self.httpd.server_close()


def test_streaming_client_measures_ttft_and_time_per_token():
    with FakeOpenAI(step_s=0.05, first_s=0.1).running() as fake:
        got = servers.stream_completion(fake.url, "tiny", servers.Request("w1 w2", 5), 0, 30)
    assert got["output_tokens"] == 5 and got["token_ids"] == [" w1"] * 5
    assert got["top_logprobs"] == [{" w1": -0.25}] * 5
    assert 0.1 <= got["ttft_s"] < 1.0
    # The fake sleeps 0.05 s per token; chunks can arrive a little early (socket buffering).
    assert 0.04 <= got["tpot_s"] < 0.5
    assert fake.paths == ["/v1/completions"]


def test_a_redirect_is_refused_and_nothing_else_is_contacted():
    decoy = FakeOpenAI(step_s=0)
    with decoy.running(), FakeOpenAI(step_s=0, redirect_to=decoy.url).running() as fake:
        server = servers.Server("a", fake.url)
        with pytest.raises(ServerFailed, match="redirect to .* refused"):
            servers.probe(server, None, 5)
    assert fake.paths == ["/v1/models"] and decoy.paths == []


def test_live_ab_between_two_fake_servers(tmp_path, capsys):
    fast, slow = FakeOpenAI(step_s=0.002), FakeOpenAI(step_s=0.03, word=" w2",
                                                     prompt_logprob=-0.75)
    out = tmp_path / "out"
    with fast.running(), slow.running():
        code = main(["ab", "--servers", fast.url, slow.url + "/v1", "--requests", "3",
                     "--concurrency", "2", "--repeats", "6", "--max-tokens", "4",
                     "--prompt-len", "8", "--num-prompts", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    for fake in (fast, slow):  # only the given servers' three paths, 7 rounds of 3 requests
        assert sorted(set(fake.paths)) == ["/v1/completions", "/v1/models", "/version"]
        # ... and one echoed completion per held-out prompt
        assert fake.paths.count("/v1/completions") == 21 + 2
    summary = json.loads((out / "ab.json").read_text())
    assert summary["order"] == [[summary["servers"][i]["label"] for i in b]
                                for b in servers.stats.block_order(2, 7, seed=0)]
    reference, other = summary["servers"]
    assert [len(s["rounds"]) for s in summary["servers"]] == [6, 6]
    assert all(len(r["requests"]) == 3 for r in other["rounds"])
    assert other["tpot_verdict"] == "worse" and other["tpot_speedup"]["hi"] < 1
    assert reference["token_agreement"] == 1.0 and other["token_agreement"] == 0.0
    assert other["info"] == {"kind": "external", "models": ["tiny"], "vllm": "fake-1"}
    # Two held-out prompts of 8 words: 7 scored tokens each, -0.25 and -0.75 per token.
    assert reference["nll"] == {"logprob_sum": -3.5, "tokens": 14, "per_prompt": [
        {"logprob_sum": -1.75, "tokens": 7}, {"logprob_sum": -1.75, "tokens": 7}]}
    assert other["nll"]["logprob_sum"] == -10.5
    assert other["nll_increase"] == pytest.approx(0.5)
    assert reference["nll_increase"] == 0.0
    assert "held-out NLL +0.5000 nats/token against the reference" in " ".join(printed.split())
    assert "external: its patches are unknown" in " ".join(printed.split())
    assert max(len(line) for line in printed.splitlines() if "━" not in line) <= 80, printed
    assert (out / "ab.png").stat().st_size > 0


def test_held_out_nll_is_measured_one_prompt_at_a_time_or_said_missing(tmp_path):
    with FakeOpenAI(step_s=0, prompt_logprob=-0.5).running() as fake:
        got = servers.prompt_nll(fake.url, "tiny", ["a b c", "a b"], 5)
    assert got == {"logprob_sum": -1.5, "tokens": 3, "per_prompt": [
        {"logprob_sum": -1.0, "tokens": 2}, {"logprob_sum": -0.5, "tokens": 1}]}
    assert fake.paths == ["/v1/completions"] * 2
    with FakeOpenAI(step_s=0, prompt_logprob=None).running() as fake, \
            pytest.raises(ServerFailed) as info:
        servers.prompt_nll(fake.url, "tiny", ["a b c"], 5)
    assert str(info.value) == f'{fake.url}: HTTP 400: {{"error": "echo is not supported"}}'


def test_server_table_fits_80_columns():
    est = servers.stats.estimate
    row = {"label": "127.0.0.1:65535", "ttft_s": est([0.1234] * 9), "tpot_s": est([0.0123] * 9),
           "requests_per_s": est([12.5] * 9), "token_agreement": 0.875,
           "ttft_speedup": est([1.234] * 9), "tpot_speedup": est([0.987] * 9),
           "requests_per_s_ratio": est([1.01] * 9), "ttft_verdict": "better",
           "tpot_verdict": "worse", "requests_per_s_verdict": "better", "exact_match_rate": 0.5,
           "first_logprob_mean_abs_diff": 0.01, "described": "http://127.0.0.1:65535, model m",
           "nll_increase": 0.0123, "perplexity": 12.5, "perplexity_error": None}
    buffer = io.StringIO()
    servers.print_servers(Console(file=buffer, width=80, color_system=None), [row, dict(row)],
                            "heading")
    text = buffer.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert " A        123 [123, 123]   12.3 [12.3, 12.3]   12.5 [12.5, 12.5]   87.5%" in text, text
    # The widest figures a slow server gives, with the longest label kept as it is.
    wide = dict(row, label="8-chars-", ttft_s=est([1.2345, 0.9876, 9.9999, 2.5, 3, 4]),
                tpot_s=est([0.0912, 0.0834, 0.1302, 0.1, 0.09, 0.095]),
                requests_per_s=est([7.34, 5.42, 11.99, 8, 9, 10]))
    buffer = io.StringIO()
    servers.print_servers(Console(file=buffer, width=80, color_system=None),
                            [wide, dict(wide, label="8-chars+")], "heading")
    text = buffer.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert " 8-chars-   2750 [988, 10000]   93 [83, 130]   8.5 [5.4, 12.0]   87.5%" in text, text
    assert " 8-chars+   1.234 [1.234, 1.234]   0.987 [0.987, 0.987]   1.010 [1.010, 1.010]" in text

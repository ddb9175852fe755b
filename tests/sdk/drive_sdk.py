"""Drives the official `dashscope` Python SDK against embedgate (tests/sdk.rs).

Usage: python drive_sdk.py CASE...   (cases: a b c c_mixed d e f g_text
g_c g_factor0 g_badkey g_file h too_large_requests too_large_http_client
too_large_sdk). Env: GATEWAY (http://127.0.0.1:PORT/api/v1), TENANT_KEY,
SDK_TMPDIR (a writable directory for the file:// cases).

Prints one JSON line per case: {"case", "ok", "status_code", "code",
"message", "embedding_len", "usage", "request_id", "headers", ...}. A case
that raises unexpectedly prints {"case", "ok": false, "error": traceback}.
"""

import asyncio
import http.client
import json
import os
import sys
import traceback

import dashscope
from dashscope import (
    AioMultiModalEmbedding,
    MultiModalEmbedding,
    MultiModalEmbeddingItemAudio,
    MultiModalEmbeddingItemImage,
    MultiModalEmbeddingItemText,
)

GATEWAY = os.environ["GATEWAY"]
KEY = os.environ["TENANT_KEY"]
TMPDIR = os.environ["SDK_TMPDIR"]
MODEL = MultiModalEmbedding.Models.multimodal_embedding_one_peace_v1
IMAGE = "https://dashscope.oss-cn-beijing.aliyuncs.com/images/256_1.png"
AUDIO = "https://dashscope.oss-cn-beijing.aliyuncs.com/audios/cow.flac"

dashscope.base_http_api_url = GATEWAY


def lower_headers(h):
    return {str(k).lower(): str(v) for k, v in dict(h or {}).items()}


def v1(resp, **extra):
    """Summarises a 1.x DashScopeAPIResponse."""
    output = resp.output or {}
    emb = output.get("embedding") if isinstance(output, dict) else None
    out = {
        "status_code": int(resp.status_code),
        "code": resp.code,
        "message": resp.message,
        "embedding_len": len(emb) if emb is not None else None,
        "usage": resp.usage,
        "request_id": resp.request_id,
        "headers": lower_headers(getattr(resp, "headers", None)),
    }
    out.update(extra)
    return out


def v1_call(input, key=KEY):
    return MultiModalEmbedding.call(
        model=MODEL, input=input, auto_truncation=True, api_key=key
    )


def case_a():
    return v1(v1_call([{"image": IMAGE}]))


def case_b():
    return v1(v1_call([{"image": IMAGE}, {"audio": AUDIO}]))


def case_c():
    items = [
        MultiModalEmbeddingItemText(text="你好", factor=1),
        MultiModalEmbeddingItemAudio(audio=AUDIO, factor=2),
        MultiModalEmbeddingItemImage(image=IMAGE, factor=3),
    ]
    return v1(v1_call(items))


def case_c_mixed():
    # The same contents as (c) as plain dicts, with factors typed differently
    # (1.0, "2", "3") and modality-first key order: SPEC §2 makes it one key.
    items = [
        {"text": "你好", "factor": 1.0},
        {"audio": AUDIO, "factor": "2"},
        {"image": IMAGE, "factor": "3"},
    ]
    return v1(v1_call(items))


def local_png(name):
    path = os.path.join(TMPDIR, name)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + name.encode() + b" embedgate sdk test")
    return path


def case_d():
    item = {"image": "file://" + local_png("sdk-1x.png")}
    resp = v1_call([item])
    # The SDK rewrites the caller's dict to the oss:// URL it uploaded to.
    return v1(resp, sent=item["image"])


def case_e():
    return case_a()


def case_f():
    return v1(v1_call([{"image": IMAGE}], key="sk-not-a-tenant-key"))


def v2_client(key=KEY):
    return dashscope.Client(api_key=key, base_url=GATEWAY)


def v2(resp, **extra):
    embs = resp.embeddings or []
    usage = resp.usage.model_dump(exclude_unset=True) if resp.usage is not None else None
    out = {
        "status_code": 200,
        "code": None,
        "embedding_len": len(embs[0].embedding) if embs else None,
        "embeddings": len(embs),
        "usage": usage,
        "request_id": resp.request_id,
        "headers": lower_headers(getattr(resp, "headers", None)),
    }
    out.update(extra)
    return out


def v2_error(e):
    return {
        "exception": type(e).__name__,
        "status_code": getattr(e, "status_code", None),
        "code": getattr(e, "code", None),
        "message": getattr(e, "message", str(e)),
        "request_id": getattr(e, "request_id", None),
        "headers": lower_headers(getattr(e, "headers", None)),
    }


def case_g_text():
    resp = v2_client().multimodal.embeddings.create(
        model=MODEL, input=[{"text": "hi"}], parameters={"auto_truncation": True}
    )
    return v2(resp)


def case_g_c():
    # (c) again through the 2.x client: compact JSON, other key order, float
    # factors. Same request, so a cache hit.
    from dashscope.v2.resources.multimodal.embeddings import EmbeddingItem

    items = [
        EmbeddingItem(text="你好", factor=1),
        EmbeddingItem(audio=AUDIO, factor=2),
        EmbeddingItem(image=IMAGE, factor=3),
    ]
    resp = v2_client().multimodal.embeddings.create(
        model=MODEL, input=items, parameters={"auto_truncation": True}
    )
    return v2(resp)


def case_g_factor0():
    try:
        resp = v2_client().multimodal.embeddings.create(
            model=MODEL,
            input=[{"text": "hi", "factor": 0}],
            parameters={"auto_truncation": True},
        )
    except dashscope.v2.errors.DashScopeError as e:
        return v2_error(e)
    return v2(resp, exception=None)


def case_g_badkey():
    try:
        resp = v2_client("sk-not-a-tenant-key").multimodal.embeddings.create(
            model=MODEL, input=[{"text": "hi"}], parameters={"auto_truncation": True}
        )
    except dashscope.v2.errors.DashScopeError as e:
        return v2_error(e)
    return v2(resp, exception=None)


def case_g_file():
    item = {"image": "file://" + local_png("sdk-2x.png")}
    resp = v2_client().multimodal.embeddings.create(
        model=MODEL, input=[item], parameters={"auto_truncation": True}
    )
    return v2(resp)


def case_h():
    async def run():
        try:
            return await AioMultiModalEmbedding.call(
                model=MODEL, input=[{"text": "async hello"}], auto_truncation=True, api_key=KEY
            )
        finally:
            await dashscope.close_shared_aio_session()

    return v1(asyncio.run(run()))


# Bodies over the gateway's 1 MiB limit: the client is still sending when
# the 413 is answered, and must read it rather than a broken pipe or reset.
EMBED_PATH = "/services/embeddings/multimodal-embedding/multimodal-embedding"
HEADERS = {"Authorization": "Bearer " + KEY, "Content-Type": "application/json"}


def too_large_body(size):
    return json.dumps(
        {"model": MODEL, "input": {"contents": [{"text": "x" * size}]}}
    ).encode()


def tally(tries, send):
    """Calls send() -> (status, code) `tries` times; counts the 413
    BadRequest.TooLarge answers and lists anything else (connection errors
    included)."""
    got, errors = 0, []
    for _ in range(tries):
        try:
            status, code = send()
            if status == 413 and code == "BadRequest.TooLarge":
                got += 1
            else:
                errors.append("HTTP %s %s" % (status, code))
        except Exception as e:  # a reset or broken pipe is what is counted
            errors.append("%s: %s" % (type(e).__name__, e))
    return {"tries": tries, "got_413": got, "errors": errors}


def case_too_large_requests():
    # `requests`, as the 1.x SDK sends: a 2 MB body in one piece.
    import requests

    body = too_large_body(2 * 1024 * 1024)

    def send():
        r = requests.post(GATEWAY + EMBED_PATH, data=body, headers=HEADERS, timeout=30)
        return r.status_code, r.json().get("code")

    return tally(20, send)


def case_too_large_http_client():
    # The standard library's client does not read past a failed send, so it
    # shows a reset that `requests` may hide; 8 MB keeps it sending long after
    # the answer.
    from urllib.parse import urlsplit

    u = urlsplit(GATEWAY)
    body = too_large_body(8 * 1024 * 1024)

    def send():
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        try:
            c.request("POST", u.path + EMBED_PATH, body=body, headers=HEADERS)
            r = c.getresponse()
            return r.status, json.loads(r.read()).get("code")
        finally:
            c.close()

    return tally(20, send)


def case_too_large_sdk():
    def send():
        r = MultiModalEmbedding.call(
            model=MODEL, input=[{"text": "x" * (2 * 1024 * 1024)}], api_key=KEY
        )
        return int(r.status_code), r.code

    return tally(5, send)


def main():
    for name in sys.argv[1:]:
        fn = globals().get("case_" + name)
        try:
            if fn is None:
                raise KeyError("no such case: " + name)
            line = {"case": name, "ok": True, **fn()}
        except Exception:  # report and go on with the next case
            line = {"case": name, "ok": False, "error": traceback.format_exc()}
        print(json.dumps(line, ensure_ascii=False, default=str), flush=True)


if __name__ == "__main__":
    main()

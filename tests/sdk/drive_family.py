"""Drives the official SDKs over every embedding route of the DashScope
family (tests/sdk_family.rs): the `dashscope` SDK (1.x classes and the 2.x
Client / AsyncClient) on the native text, multimodal and batch-task routes,
and the `openai` SDK on the OpenAI-compatible route.

Usage: python drive_family.py CASE...
Env: BASE (the host root, http://127.0.0.1:PORT, without /api/v1), KEY (the
key to call with), OTHER_KEY and TASK_ID (for fetch_other: another key
reading a task of KEY's).

Prints one JSON line per case: {"case", "ok": true, ...what the SDK
returned: vectors, indices, types, usage, headers, task ids/statuses, or
the error's class/status/code}. A case that raises unexpectedly prints
{"case", "ok": false, "error": traceback}.
"""

import asyncio
import json
import os
import sys
import traceback

import dashscope
import openai
from dashscope import BatchTextEmbedding, MultiModalEmbedding, TextEmbedding

BASE = os.environ["BASE"].rstrip("/")
KEY = os.environ["KEY"]
API = BASE + "/api/v1"
COMPAT = BASE + "/compatible-mode/v1"
IMAGE = "https://dashscope.oss-cn-beijing.aliyuncs.com/images/256_1.png"
TEXTS5 = ["the first text", "a second one", "三番目", "fourth", "and a fifth, longer text"]
BATCH_URL_1X = "https://example.com/embedgate/batch-1x.txt"
BATCH_URL_2X = "https://example.com/embedgate/batch-2x.txt"

dashscope.base_http_api_url = API


def lower_headers(h):
    return {str(k).lower(): str(v) for k, v in dict(h or {}).items()}


def v1_embeddings(resp, **extra):
    """A 1.x text or multimodal answer: the raw output.embeddings."""
    output = resp.output if isinstance(resp.output, dict) else {}
    embs = output.get("embeddings") or []
    out = {
        "status_code": int(resp.status_code),
        "code": resp.code,
        "message": resp.message,
        "vectors": [e.get("embedding") for e in embs],
        "indices": [e.get("text_index", e.get("index")) for e in embs],
        "types": [e.get("type") for e in embs],
        "usage": resp.usage,
        "request_id": resp.request_id,
        "headers": lower_headers(getattr(resp, "headers", None)),
    }
    out.update(extra)
    return out


def v2_embeddings(resp, **extra):
    embs = resp.embeddings or []
    out = {
        "status_code": 200,
        "vectors": [list(e.embedding) for e in embs],
        "indices": [e.index for e in embs],
        "types": [e.type for e in embs],
        "usage": resp.usage.model_dump() if resp.usage is not None else None,
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
    }


def client(key=KEY):
    # No retries: every attempt the gateway sees is one the test made.
    return dashscope.Client(api_key=key, base_url=API, max_retries=0)


# --- text ---------------------------------------------------------------


def case_text_1x():
    resp = TextEmbedding.call(
        model="text-embedding-v4",
        input=TEXTS5,
        dimension=512,
        text_type="query",
        api_key=KEY,
    )
    return v1_embeddings(resp)


def case_text_2x():
    resp = client().embeddings.create(
        model="text-embedding-v4",
        input=["client two", "second of two"],
        dimension=256,
        text_type="document",
    )
    return v2_embeddings(resp)


def case_text_async():
    async def run():
        async with dashscope.AsyncClient(api_key=KEY, base_url=API, max_retries=0) as c:
            return await c.embeddings.create(
                model="text-embedding-v3", input=["async one", "async two"]
            )

    return v2_embeddings(asyncio.run(run()))


# --- multimodal ---------------------------------------------------------


def case_mm_v1():
    resp = MultiModalEmbedding.call(
        model="multimodal-embedding-v1",
        input=[{"text": "a red bicycle leaning on a wall"}, {"image": IMAGE}],
        api_key=KEY,
    )
    return v1_embeddings(resp)


def case_mm_plus():
    resp = MultiModalEmbedding.call(
        model="tongyi-embedding-vision-plus",
        input=[{"image": IMAGE}, {"text": "a red bicycle leaning on a wall"}],
        dimension=512,
        api_key=KEY,
    )
    return v1_embeddings(resp)


def case_mm_2x():
    resp = client().multimodal.embeddings.create(
        model="tongyi-embedding-vision-flash",
        input=[{"text": "flash text"}, {"image": IMAGE}],
        dimension=256,
    )
    return v2_embeddings(resp)


def case_mm_fusion():
    resp = client().multimodal.embeddings.create(
        model="qwen3-vl-embedding",
        input=[{"text": "fused text"}, {"image": IMAGE}],
        enable_fusion=True,
        dimension=1024,
    )
    return v2_embeddings(resp)


# --- batch tasks ----------------------------------------------------------


def task_summary(resp):
    output = resp.output
    usage = resp.usage
    return {
        "status_code": int(resp.status_code),
        "code": resp.code,
        "task_id": output.task_id if output is not None else None,
        "task_status": output.task_status if output is not None else None,
        "url": output.url if output is not None else None,
        "usage": dict(usage) if usage is not None else None,
    }


def case_batch_1x():
    sub = BatchTextEmbedding.async_call(
        model="text-embedding-async-v2", url=BATCH_URL_1X, text_type="query", api_key=KEY
    )
    submitted = task_summary(sub)
    fetched = task_summary(BatchTextEmbedding.fetch(sub, api_key=KEY))
    waited = task_summary(BatchTextEmbedding.wait(sub, api_key=KEY))
    # A second task, canceled while still PENDING.
    other = BatchTextEmbedding.async_call(
        model="text-embedding-async-v1", url=BATCH_URL_1X + "?2", api_key=KEY
    )
    cancel = BatchTextEmbedding.cancel(other, api_key=KEY)
    after_cancel = task_summary(BatchTextEmbedding.fetch(other, api_key=KEY))
    listed = BatchTextEmbedding.list(page_no=1, page_size=10, api_key=KEY)
    lout = listed.output if isinstance(listed.output, dict) else {}
    return {
        "submitted": submitted,
        "fetched": fetched,
        "waited": waited,
        "canceled_id": other.output.task_id,
        "cancel_status": int(cancel.status_code),
        "cancel_code": cancel.code,
        "after_cancel": after_cancel,
        "list_status": int(listed.status_code),
        "list_total": lout.get("total"),
        "list_ids": [t.get("task_id") for t in lout.get("data") or []],
    }


def job_summary(job):
    return {
        "task_id": job.task_id,
        "status": job.status,
        "result_url": job.result_url,
        "usage": job.usage.model_dump() if job.usage is not None else None,
    }


def case_batch_2x():
    jobs = client().embeddings.jobs
    job = jobs.create(model="text-embedding-async-v1", file_url=BATCH_URL_2X)
    created = job_summary(job)
    fetched = job_summary(jobs.fetch(job.task_id))
    waited = job_summary(jobs.wait(job.task_id))
    listed = jobs.list(page_no=1, page_size=10)
    return {
        "created": created,
        "fetched": fetched,
        "waited": waited,
        "list_total": listed.total,
        # The 2.x JobList reads `tasks`; a `data` list reads as no tasks.
        "list_tasks": [t.task_id for t in listed.tasks],
    }


def case_fetch_other():
    """Another key reads TASK_ID: 1.x fetch and 2.x jobs.fetch."""
    other = os.environ["OTHER_KEY"]
    task_id = os.environ["TASK_ID"]
    resp = BatchTextEmbedding.fetch(task_id, api_key=other)
    out = {
        "status_code": int(resp.status_code),
        "code": resp.code,
        "task_status": resp.output.task_status if resp.output is not None else None,
    }
    try:
        job = client(other).embeddings.jobs.fetch(task_id)
        out["v2"] = {"exception": None, "status": job.status}
    except dashscope.v2.errors.DashScopeError as e:
        out["v2"] = v2_error(e)
    return out


# --- OpenAI-compatible ----------------------------------------------------


def oai(key=KEY):
    return openai.OpenAI(api_key=key, base_url=COMPAT, max_retries=0)


def oai_summary(raw):
    resp = raw.parse()
    return {
        "status_code": raw.status_code,
        "vectors": [list(d.embedding) for d in resp.data],
        "indices": [d.index for d in resp.data],
        "model": resp.model,
        "usage": resp.usage.model_dump(),
        "headers": lower_headers(raw.headers),
    }


def case_oai_default():
    # No encoding_format: the SDK asks for base64 and decodes it.
    raw = oai().embeddings.with_raw_response.create(
        model="text-embedding-v4", input=["compat one", "compat two"], dimensions=512
    )
    return oai_summary(raw)


def case_oai_float():
    raw = oai().embeddings.with_raw_response.create(
        model="text-embedding-v4",
        input=["compat one", "compat two"],
        dimensions=512,
        encoding_format="float",
    )
    return oai_summary(raw)


def case_oai_notfound():
    try:
        oai().embeddings.create(model="multimodal-embedding-v1", input="x")
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        return {
            "exception": type(e).__name__,
            "status_code": e.status_code,
            "code": getattr(e, "code", None),
            "type": getattr(e, "type", None),
            "message": str(e),
            "body_keys": sorted(body.keys()),
        }
    return {"exception": None}


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

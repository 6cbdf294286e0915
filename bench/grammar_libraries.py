#!/usr/bin/env python
"""Structured-output library evaluation: xgrammar vs llguidance vs outlines-core, on
SmolLM2's tokenizer, single-threaded: what chose llguidance (see
deployments/transformers_engine/grammars.py). Tokenizer-info build, compile times of
five schemas, per-token mask + advance cost, which JSON Schema keywords each enforces,
its errors for bad schemas, and its batch mask API.

Needs the two other libraries, which the project does not install; in a venv of their own:
    pip install --no-deps xgrammar==0.2.9 outlines-core==0.2.14 apache-tvm-ffi==0.1.15.post2
    OMP_NUM_THREADS=1 RAYON_NUM_THREADS=1 python bench/grammar_libraries.py
Writes bench/results/grammar_libraries.json (the run of 2026-11-30 is committed).
"""
import os

for _k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS",
           "TOKENIZERS_PARALLELISM"):
    os.environ.setdefault(_k, "1" if _k != "TOKENIZERS_PARALLELISM" else "false")

import tempfile  # noqa: E402

_SCRATCH = tempfile.mkdtemp(prefix="grammar-libraries-")  # torch.compile's output stays in here
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", f"{_SCRATCH}/inductor_cache")
os.environ.setdefault("TRITON_CACHE_DIR", f"{_SCRATCH}/triton_cache")
os.environ["TMPDIR"] = _SCRATCH  # inductor's precompiled headers go to $TMPDIR/torchinductor_<user>

import json
import platform
import statistics
import sys
import time
import traceback
import warnings
import importlib.metadata as md
from typing import List, Literal, Optional

import torch

torch.set_num_threads(1)

from pydantic import BaseModel
from transformers import AutoTokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from deployments.model_source import embedded_model_folder  # noqa: E402

TOK_DIR = str(embedded_model_folder())
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "grammar_libraries.json")
PADDED_VOCAB = 49152 + 64  # simulate an lm_head padded beyond the tokenizer vocab
REPEATS = 5  # walks per instance for per-token timing

R = {"machine": {}, "versions": {}, "schemas": {}, "libs": {}}


def now():
    return time.perf_counter()


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


R["machine"] = {"cpu_model": cpu_model(), "nproc": os.cpu_count(), "python": sys.version.split()[0],
                "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
for p in ["xgrammar", "llguidance", "outlines-core", "apache-tvm-ffi", "torch", "transformers", "pydantic",
          "triton"]:
    try:
        R["versions"][p] = md.version(p)
    except md.PackageNotFoundError:
        R["versions"][p] = None
for p in ["xgrammar", "llguidance", "outlines-core"]:
    m = md.metadata(p)
    R["versions"][p + "_license"] = m.get("License-Expression") or m.get("License")

# ----------------------------------------------------------------------------------------------
# Schemas and instances
# ----------------------------------------------------------------------------------------------
S = {}
S["a_flat"] = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "active": {"type": "boolean"}},
    "required": ["name", "age", "active"], "additionalProperties": False}
S["b_nested"] = {"type": "object", "properties": {
    "order_id": {"type": "string"},
    "customer": {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
                 "required": ["name", "email"], "additionalProperties": False},
    "items": {"type": "array", "minItems": 1, "items": {
        "type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"},
                                         "price": {"type": "number"}},
        "required": ["sku", "qty", "price"], "additionalProperties": False}}},
    "required": ["order_id", "customer", "items"], "additionalProperties": False}
S["c_enum"] = {"type": "object", "properties": {
    "color": {"enum": ["red", "green", "blue"]},
    "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
    "priority": {"enum": [1, 2, 3]}},
    "required": ["color", "size", "priority"], "additionalProperties": False}
S["d_bounds"] = {"type": "object", "properties": {
    "temperature": {"type": "number", "minimum": -50, "maximum": 60},
    "ratio": {"type": "number", "minimum": 0, "maximum": 1},
    "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["temperature", "ratio", "age"], "additionalProperties": False}
S["e_large"] = {"type": "object", "properties": {
    "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
    "title": {"type": "string", "minLength": 1, "maxLength": 80},
    "description": {"type": "string"},
    "status": {"enum": ["open", "in_progress", "closed"]},
    "priority": {"type": "integer", "minimum": 1, "maximum": 5},
    "score": {"type": "number", "minimum": 0, "maximum": 100},
    "is_public": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    "owner": {"type": "object", "properties": {"name": {"type": "string"}, "id": {"type": "integer"}},
              "required": ["name", "id"], "additionalProperties": False},
    "due_date": {"type": "string", "format": "date"},
    "estimate_hours": {"type": ["number", "null"]},
    "assignee": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    "version": {"const": 2},
    "links": {"type": "array", "items": {"type": "object", "properties": {
        "url": {"type": "string"}, "kind": {"enum": ["blocks", "relates"]}},
        "required": ["url", "kind"], "additionalProperties": False}},
    "watchers": {"type": "integer", "minimum": 0}},
    "required": ["id", "title", "description", "status", "priority", "score", "is_public", "tags", "owner",
                 "due_date", "estimate_hours", "assignee", "version", "links", "watchers"],
    "additionalProperties": False}

INST = {
    "a_flat": {"name": "Alice", "age": 31, "active": True},
    "b_nested": {"order_id": "ORD-12345", "customer": {"name": "Bob Smith", "email": "bob@example.com"},
                 "items": [{"sku": "A-1", "qty": 2, "price": 9.99}, {"sku": "B-22", "qty": 1, "price": 120.5},
                           {"sku": "C-333", "qty": 10, "price": 0.25}]},
    "c_enum": {"color": "green", "size": "XL", "priority": 2},
    "d_bounds": {"temperature": -12.5, "ratio": 0.75, "age": 42},
    "e_large": {"id": "ABC-1234", "title": "Fix the login page crash",
                "description": "Users report a crash when the password field is empty.",
                "status": "in_progress", "priority": 2, "score": 87.5, "is_public": False,
                "tags": ["bug", "auth", "ui"], "owner": {"name": "Carol", "id": 77}, "due_date": "2025-03-14",
                "estimate_hours": 4.5, "assignee": None, "version": 2,
                "links": [{"url": "https://example.com/issue/1", "kind": "blocks"}], "watchers": 3},
}
# Instances that are valid JSON and match every keyword EXCEPT a numeric bound (for d_bounds)
BOUND_VIOLATIONS = {
    "age=200 (max 150)": {"temperature": 20, "ratio": 0.5, "age": 200},
    "age=-1 (min 0)": {"temperature": 20, "ratio": 0.5, "age": -1},
    "temperature=70 (max 60)": {"temperature": 70, "ratio": 0.5, "age": 5},
    "temperature=-60.5 (min -50)": {"temperature": -60.5, "ratio": 0.5, "age": 5},
    "ratio=1.5 (max 1)": {"temperature": 20, "ratio": 1.5, "age": 5},
}
OTHER_VIOLATIONS = {  # (schema, instance) pairs that violate something that is NOT a numeric bound
    "enum color=purple": ("c_enum", {"color": "purple", "size": "S", "priority": 1}),
    "missing required age": ("a_flat", {"name": "x", "active": True}),
    "extra property": ("a_flat", {"name": "x", "age": 1, "active": True, "zzz": 1}),
    "string for int": ("a_flat", {"name": "x", "age": "1", "active": True}),
    "pattern id=abc-1": ("e_large", dict(INST["e_large"], id="abc-1")),
    "maxItems tags=6": ("e_large", dict(INST["e_large"], tags=["a", "b", "c", "d", "e", "f"])),
    "const version=3": ("e_large", dict(INST["e_large"], version=3)),
    "format date=2025-13-99x": ("e_large", dict(INST["e_large"], due_date="yesterday")),
}


class Address(BaseModel):
    street: str
    city: str
    zip_code: Optional[str] = None


class Person(BaseModel):
    name: str
    role: Literal["admin", "user", "guest"]
    address: Address
    nickname: Optional[str] = None
    tags: List[str] = []


PYD_SCHEMA = Person.model_json_schema()
PYD_VALID = {"name": "Dana", "role": "admin", "address": {"street": "1 Main St", "city": "Oslo", "zip_code": None},
             "nickname": None, "tags": ["x"]}
PYD_VALID_MIN = {"name": "Dana", "role": "user", "address": {"street": "1 Main St", "city": "Oslo"}}
PYD_INVALID = {"name": "Dana", "role": "root", "address": {"street": "1 Main St", "city": "Oslo"}}

BAD_SCHEMAS = {
    "type_nonsense": {"type": "object", "properties": {"a": {"type": "nonsense"}}},
    "kw_not": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}, "required": ["a"]},
    "kw_uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "kw_if_then_else": {"type": "object", "properties": {"a": {"type": "integer"}},
                        "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["a"]}},
    "kw_multipleOf": {"type": "integer", "multipleOf": 7},
    "kw_patternProperties": {"type": "object", "patternProperties": {"^x_": {"type": "integer"}}},
    "dangling_ref": {"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}},
    "not_json_object": "this is not json",
}

R["schemas"] = {"schemas": S, "instances": INST, "pydantic_schema": PYD_SCHEMA}

# ----------------------------------------------------------------------------------------------
tok = AutoTokenizer.from_pretrained(TOK_DIR)
EOS = tok.eos_token_id
VOCAB = len(tok)
R["tokenizer"] = {"class": type(tok).__name__, "len": VOCAB, "eos_token_id": EOS, "eos_token": tok.eos_token,
                  "model_config_vocab_size": json.load(open(os.path.join(TOK_DIR, "config.json")))["vocab_size"]}


def enc(text):
    return tok.encode(text, add_special_tokens=False)


def dumps(obj):
    return json.dumps(obj)  # default separators ", " and ": " (one space: allowed by every lib's default ws)


def bit(mask_row, t):
    return (int(mask_row[t >> 5]) >> (t & 31)) & 1


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    k = min(len(xs) - 1, max(0, int(round(q / 100.0 * (len(xs) - 1)))))
    return xs[k]


def summarize_us(ns_list):
    us = [x / 1000.0 for x in ns_list]
    return {"n": len(us), "mean_us": round(statistics.mean(us), 2), "p50_us": round(pct(us, 50), 2),
            "p99_us": round(pct(us, 99), 2), "max_us": round(max(us), 2)}


def err(e):
    return {"exception": type(e).__module__ + "." + type(e).__name__, "message": str(e)[:600]}


X_TOKEN = enc("x")[0]            # a letter: never valid as first char of a JSON object
OPEN_BRACE = enc("{")[0]


# ----------------------------------------------------------------------------------------------
# Library adapters: each exposes build(), compile(schema)->handle, matcher(handle), fill(m, mask, row),
# accept(m, tok)->bool, accepting(m), terminated(m), rollback(m, n)
# ----------------------------------------------------------------------------------------------
class XGrammarLib:
    name = "xgrammar"

    def build(self, vocab_size=VOCAB):
        import xgrammar as xgr
        self.xgr = xgr
        t0 = now()
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size)
        t_info = now() - t0
        t0 = now()
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=True)
        t_comp = now() - t0
        return {"tokenizer_info_s": t_info, "compiler_ctor_s": t_comp, "vocab_type": str(self.info.vocab_type),
                "info_vocab_size": self.info.vocab_size, "stop_token_ids": self.info.stop_token_ids}

    def compile(self, schema):
        s = schema if isinstance(schema, str) else json.dumps(schema)
        return self.compiler.compile_json_schema(s)  # any_whitespace=True, strict_mode=True defaults

    def compile_any_json(self):
        return self.compiler.compile_builtin_json_grammar()

    def clear_cache(self):
        self.compiler.clear_cache()

    def matcher(self, h):
        return self.xgr.GrammarMatcher(h)

    def alloc(self, rows):
        return self.xgr.allocate_token_bitmask(rows, self.info.vocab_size)

    def fill(self, m, mask, row=0):
        m.fill_next_token_bitmask(mask, row)

    def accept(self, m, t):
        return m.accept_token(t)

    def accepting(self, m):
        return m.is_completed()

    def terminated(self, m):
        return m.is_terminated()

    def rollback(self, m, n):
        m.rollback(n)


class LLGuidanceLib:
    name = "llguidance"

    def build(self, vocab_size=None):
        import llguidance
        import llguidance.hf
        import llguidance.torch as llt
        self.llg = llguidance
        self.llt = llt
        t0 = now()
        self.tokenizer = llguidance.hf.from_tokenizer(tok, n_vocab=vocab_size)
        t_info = now() - t0
        self._cache = {}
        return {"tokenizer_info_s": t_info, "info_vocab_size": self.tokenizer.vocab_size,
                "eos_tokens": self.tokenizer.eos_tokens}

    def grammar(self, schema):
        return self.llg.LLMatcher.grammar_from_json_schema(schema if isinstance(schema, str) else json.dumps(schema),
                                                           defaults={"whitespace_flexible": True})

    def compile(self, schema):
        # llguidance has no separate compiled-grammar object; a fresh LLMatcher compiles the grammar
        # (lexer is built lazily).  Cache = keep a pristine matcher and deep_copy() it per request.
        key = schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True)
        if key in self._cache:
            return self._cache[key]
        g = self.grammar(schema)
        m = self.llg.LLMatcher(self.tokenizer, g, log_level=0)
        if m.is_error():
            raise ValueError("llguidance grammar error: " + m.get_error())
        self._cache[key] = m
        return m

    def compile_any_json(self):
        return self.compile({"type": "object"})

    def clear_cache(self):
        self._cache = {}

    def matcher(self, h):
        return h.deep_copy()

    def alloc(self, rows):
        return self.llt.allocate_token_bitmask(rows, self.tokenizer.vocab_size)

    def fill(self, m, mask, row=0):
        self.llt.fill_next_token_bitmask(m, mask, row)

    def accept(self, m, t):
        return m.consume_token(t)

    def accepting(self, m):
        return m.is_accepting()

    def terminated(self, m):
        return m.is_stopped()

    def rollback(self, m, n):
        m.rollback(n)


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


class OutlinesCoreLib:
    name = "outlines-core"

    def build(self, vocab_size=None):
        import outlines_core as oc
        from outlines_core.json_schema import build_regex_from_schema
        import outlines_core.kernels.torch as okt
        self.oc, self.brs, self.okt = oc, build_regex_from_schema, okt
        # Vocabulary.from_pretrained() only accepts a Hub model id (it tries to download even for a
        # local path), so the vocabulary is built by hand from the HF tokenizer (GPT-2 byte-level).
        t0 = now()
        dec = {v: k for k, v in _bytes_to_unicode().items()}
        special = set(tok.all_special_ids)
        m = {}
        for token, tid in tok.get_vocab().items():
            if tid in special or tid == EOS:
                continue
            try:
                b = bytes(dec[c] for c in token)
            except KeyError:
                b = token.encode("utf-8")
            m.setdefault(b, []).append(tid)
        self.vocab = oc.Vocabulary(EOS, m)
        t_info = now() - t0
        self.vocab_size = vocab_size or VOCAB
        self._cache = {}
        return {"tokenizer_info_s": t_info, "note": "Vocabulary built by hand (from_pretrained needs the HF Hub)"}

    def compile(self, schema):
        key = schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True)
        if key in self._cache:
            return self._cache[key]
        regex = self.brs(schema if isinstance(schema, str) else json.dumps(schema))
        idx = self.oc.Index(regex, self.vocab)
        self._cache[key] = idx
        return idx

    def compile_any_json(self):
        return self.compile({"type": "object"})

    def clear_cache(self):
        self._cache = {}

    def matcher(self, h):
        return self.oc.Guide(h)

    def alloc(self, rows):
        return torch.full((rows, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)

    def fill(self, m, mask, row=0):
        v = mask[row]
        m.write_mask_into(v.data_ptr(), v.numel(), v.element_size())

    def accept(self, m, t):
        try:
            m.advance(t, return_tokens=False)
            return True
        except Exception:
            return False

    def accepting(self, m):
        return m.is_finished()

    def terminated(self, m):
        return m.is_finished()

    def rollback(self, m, n):
        m.rollback_state(n)


# ----------------------------------------------------------------------------------------------
def accepts_text(lib, handle, text):
    """Feed the tokenization of text; return (all tokens accepted, accepting state at end, eos allowed)."""
    m = lib.matcher(handle)
    ok = True
    for t in enc(text):
        if not lib.accept(m, t):
            ok = False
            break
    acc = lib.accepting(m) if ok else False
    eos_allowed = None
    if ok:
        mask = lib.alloc(1)
        lib.fill(m, mask, 0)
        eos_allowed = bool(bit(mask[0], EOS))
    return {"tokens_accepted": ok, "accepting_at_end": acc, "eos_allowed_at_end": eos_allowed,
            "accepted_as_complete": bool(ok and (acc or eos_allowed))}


def walk(lib, handle, text, repeats=REPEATS):
    """Simulated greedy decode: per token fill mask + advance; check correctness."""
    toks = enc(text)
    fill_ns, adv_ns, tot_ns = [], [], []
    correct = True
    first_bad = None
    mask = lib.alloc(1)
    inval = {}
    for rep in range(repeats):
        m = lib.matcher(handle)
        for i, t in enumerate(toks):
            t0 = time.perf_counter_ns()
            lib.fill(m, mask, 0)
            t1 = time.perf_counter_ns()
            if rep == 0:
                if i == 0:
                    inval["x_disallowed_at_start"] = not bit(mask[0], X_TOKEN)
                    inval["eos_disallowed_at_start"] = not bit(mask[0], EOS)
                    inval["open_brace_allowed_at_start"] = bool(bit(mask[0], OPEN_BRACE))
                    inval["allowed_count_at_start"] = int(sum(bin(int(w) & 0xFFFFFFFF).count("1") for w in mask[0].tolist()))
                if not bit(mask[0], t):
                    correct = False
                    if first_bad is None:
                        first_bad = {"pos": i, "token": t, "piece": tok.decode([t])}
            t2 = time.perf_counter_ns()
            ok = lib.accept(m, t)
            t3 = time.perf_counter_ns()
            if not ok:
                correct = False
                if first_bad is None:
                    first_bad = {"pos": i, "token": t, "piece": tok.decode([t]), "reason": "accept failed"}
                break
            fill_ns.append(t1 - t0)
            adv_ns.append(t3 - t2)
            tot_ns.append((t1 - t0) + (t3 - t2))
        if rep == 0:
            lib.fill(m, mask, 0)
            inval["eos_allowed_at_end"] = bool(bit(mask[0], EOS))
            inval["x_disallowed_at_end"] = not bit(mask[0], X_TOKEN)
            inval["allowed_count_at_end"] = int(sum(bin(int(w) & 0xFFFFFFFF).count("1") for w in mask[0].tolist()))
            inval["accepting_at_end"] = lib.accepting(m)
            inval["terminated_before_eos"] = lib.terminated(m)
            ok_eos = lib.accept(m, EOS)
            inval["eos_accept_returned"] = ok_eos
            inval["terminated_after_eos"] = lib.terminated(m)
            try:
                lib.rollback(m, 1)
                inval["terminated_after_rollback1"] = lib.terminated(m)
            except Exception as e:
                inval["rollback_error"] = err(e)
    return {"n_tokens": len(toks), "repeats": repeats, "all_valid_tokens_allowed": correct, "first_bad": first_bad,
            "fill_mask": summarize_us(fill_ns) if fill_ns else None,
            "advance": summarize_us(adv_ns) if adv_ns else None,
            "mask_plus_advance": summarize_us(tot_ns) if tot_ns else None, "checks": inval}


def eval_lib(lib):
    out = {}
    try:
        out["build"] = lib.build()
    except Exception as e:
        out["build_error"] = err(e)
        out["trace"] = traceback.format_exc()
        return out

    # 2. compile times (cold: cache cleared before each), then warm (cache hit), + time-to-first-mask
    comp = {}
    handles = {}
    for name, sch in list(S.items()) + [("pydantic_Person", PYD_SCHEMA)]:
        lib.clear_cache()
        try:
            t0 = now()
            h = lib.compile(sch)
            t1 = now()
            m = lib.matcher(h)
            mask = lib.alloc(1)
            lib.fill(m, mask, 0)
            t2 = now()
            lib.compile(sch)  # the second compile: served from the cache
            t3 = now()
            handles[name] = h
            comp[name] = {"compile_ms": round((t1 - t0) * 1e3, 3), "to_first_mask_ms": round((t2 - t0) * 1e3, 3),
                          "cached_compile_ms": round((t3 - t2) * 1e3, 4)}
        except Exception as e:
            comp[name] = {"error": err(e)}
    lib.clear_cache()
    try:
        t0 = now()
        h = lib.compile_any_json()
        t1 = now()
        m = lib.matcher(h)
        mask = lib.alloc(1)
        lib.fill(m, mask, 0)
        t2 = now()
        comp["json_object"] = {"compile_ms": round((t1 - t0) * 1e3, 3), "to_first_mask_ms": round((t2 - t0) * 1e3, 3)}
        handles["json_object"] = h
        comp["json_object"]["accepts_nested_obj"] = accepts_text(lib, h, dumps({"a": [1, {"b": None}], "c": "d"}))
        comp["json_object"]["rejects_array_top"] = not accepts_text(lib, h, dumps([1, 2]))["accepted_as_complete"]
    except Exception as e:
        comp["json_object"] = {"error": err(e)}
    out["compile"] = comp

    # correctness on valid instances
    out["valid_instances"] = {}
    for name in S:
        if name in handles:
            out["valid_instances"][name] = accepts_text(lib, handles[name], dumps(INST[name]))
    # numeric bound enforcement
    out["bounds"] = {}
    if "d_bounds" in handles:
        for label, inst in BOUND_VIOLATIONS.items():
            r = accepts_text(lib, handles["d_bounds"], dumps(inst))
            out["bounds"][label] = {"rejected": not r["accepted_as_complete"], **r}
    out["other_violations"] = {}
    for label, (sname, inst) in OTHER_VIOLATIONS.items():
        if sname in handles:
            r = accepts_text(lib, handles[sname], dumps(inst))
            out["other_violations"][label] = {"rejected": not r["accepted_as_complete"]}
    # pydantic
    if "pydantic_Person" in handles:
        h = handles["pydantic_Person"]
        out["pydantic"] = {
            "valid_full": accepts_text(lib, h, dumps(PYD_VALID))["accepted_as_complete"],
            "valid_minimal_optional_omitted": accepts_text(lib, h, dumps(PYD_VALID_MIN))["accepted_as_complete"],
            "invalid_literal_rejected": not accepts_text(lib, h, dumps(PYD_INVALID))["accepted_as_complete"],
        }

    # 3. per-token cost
    out["walk"] = {}
    for name in ["b_nested", "e_large"]:
        if name in handles:
            out["walk"][name] = walk(lib, handles[name], dumps(INST[name]))

    # 5. bad schemas
    out["bad_schemas"] = {}
    for label, sch in BAD_SCHEMAS.items():
        lib.clear_cache()
        try:
            h = lib.compile(sch)
            res = {"compiled": True}
            if label == "kw_uniqueItems":
                res["accepts_[1,1]"] = accepts_text(lib, h, "[1, 1]")["accepted_as_complete"]
            if label == "kw_multipleOf":
                res["accepts_8"] = accepts_text(lib, h, "8")["accepted_as_complete"]
                res["accepts_14"] = accepts_text(lib, h, "14")["accepted_as_complete"]
            if label == "kw_not":
                res["accepts_a_string"] = accepts_text(lib, h, '{"a": "s"}')["accepted_as_complete"]
            if label == "type_nonsense":
                res["accepts_a_1"] = accepts_text(lib, h, '{"a": 1}')["accepted_as_complete"]
            out["bad_schemas"][label] = res
        except BaseException as e:  # noqa  (pyo3 panics are BaseException)
            out["bad_schemas"][label] = {"compiled": False, **err(e)}
    return out


# ----------------------------------------------------------------------------------------------
def apply_tests():
    """4. Batch bitmask fill + apply to a [rows, padded_vocab] logits tensor on CPU."""
    res = {}
    import xgrammar as xgr
    import llguidance
    import llguidance.hf
    import llguidance.torch as llt
    rows = 4
    constrained = [0, 2]

    def check(logits_before, logits_after, allowed_row0_bits_fn):
        r = {}
        r["unconstrained_rows_unchanged"] = bool(torch.equal(logits_before[1], logits_after[1]) and
                                                 torch.equal(logits_before[3], logits_after[3]))
        fin = torch.isfinite(logits_after[0])
        r["row0_finite_count"] = int(fin.sum())
        r["padded_tail_masked_row0"] = bool((~fin[VOCAB:]).all())
        r["x_masked_row0"] = bool(~fin[X_TOKEN])
        r["open_brace_kept_row0"] = bool(fin[OPEN_BRACE])
        return r

    # --- xgrammar: tokenizer info sized to the padded lm_head
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=PADDED_VOCAB)
    comp = xgr.GrammarCompiler(info, max_threads=1)
    cg = comp.compile_json_schema(json.dumps(S["b_nested"]))
    ms = [xgr.GrammarMatcher(cg) for _ in constrained]
    bm = xgr.allocate_token_bitmask(rows, info.vocab_size)
    logits = torch.randn(rows, PADDED_VOCAB)
    before = logits.clone()
    bmatch = xgr.BatchGrammarMatcher(max_threads=1)
    t0 = now()
    bmatch.batch_fill_next_token_bitmask(ms, bm, indices=constrained)
    t1 = now()
    xgr.apply_token_bitmask_inplace(logits, bm, indices=constrained)  # CPU kernel (C++)
    t2 = now()
    r = check(before, logits, None)
    r.update({"bitmask_shape": list(bm.shape), "batch_fill_ms": round((t1 - t0) * 1e3, 3),
              "apply_cpu_ms": round((t2 - t1) * 1e3, 3)})
    # timing of apply alone
    ts = []
    for _ in range(20):
        lg = before.clone()
        a = time.perf_counter_ns()
        xgr.apply_token_bitmask_inplace(lg, bm, indices=constrained)
        ts.append(time.perf_counter_ns() - a)
    r["apply_cpu_4rows"] = summarize_us(ts)
    # case: bitmask from tokenizer-sized info but logits padded -> warning & tail left unmasked
    info2 = xgr.TokenizerInfo.from_huggingface(tok)  # vocab_size = tokenizer size 49152
    cg2 = xgr.GrammarCompiler(info2, max_threads=1).compile_json_schema(json.dumps(S["a_flat"]))
    bm2 = xgr.allocate_token_bitmask(1, info2.vocab_size)
    xgr.GrammarMatcher(cg2).fill_next_token_bitmask(bm2)
    lg = torch.randn(1, PADDED_VOCAB)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        xgr.apply_token_bitmask_inplace(lg, bm2)
    r["unpadded_mask_on_padded_logits"] = {
        "warning": [str(x.message)[:200] for x in w],
        "tail_left_unmasked": bool(torch.isfinite(lg[0, VOCAB:]).all())}
    # torch_native backend (works on any device) for comparison
    lg = before.clone()
    try:
        xgr.apply_token_bitmask_inplace(lg, bm, indices=constrained, backend="torch_native")
        r["torch_native_backend_matches_cpu"] = bool(torch.equal(torch.isfinite(lg), torch.isfinite(logits)))
        ts = []
        for _ in range(20):
            lg = before.clone()
            a = time.perf_counter_ns()
            xgr.apply_token_bitmask_inplace(lg, bm, indices=constrained, backend="torch_native")
            ts.append(time.perf_counter_ns() - a)
        r["apply_torch_native_4rows"] = summarize_us(ts)
    except Exception as e:
        r["torch_native_backend_error"] = err(e)
    res["xgrammar"] = r

    # --- llguidance
    lt = llguidance.hf.from_tokenizer(tok, n_vocab=PADDED_VOCAB)
    g = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(S["b_nested"]))
    lms = [llguidance.LLMatcher(lt, g, log_level=0) for _ in constrained]
    bm = llt.allocate_token_bitmask(rows, lt.vocab_size)
    logits = before.clone()
    ex = llguidance.LLExecutor(num_threads=1)
    t0 = now()
    llt.fill_next_token_bitmask_par(ex, [(m, i) for m, i in zip(lms, constrained, strict=True)], bm)
    t1 = now()
    r = {"bitmask_shape": list(bm.shape), "batch_fill_ms": round((t1 - t0) * 1e3, 3)}
    # llguidance's own apply is a torch.compile'd kernel (needs inductor + a C++ compiler on CPU)
    try:
        lg = logits.clone()
        a = now()
        llt.apply_token_bitmask_inplace(lg, bm)
        r["llg_torch_compile_apply_first_call_s"] = round(now() - a, 3)
        ts = []
        for _ in range(10):
            lg2 = logits.clone()
            a = time.perf_counter_ns()
            llt.apply_token_bitmask_inplace(lg2, bm)
            ts.append(time.perf_counter_ns() - a)
        r["llg_apply_4rows"] = summarize_us(ts)
        r["llg_apply_check"] = check(before, lg, None)
    except Exception as e:
        r["llg_apply_error"] = err(e)
    # interop: the bitmask format is identical, so xgrammar's CPU kernel works on llguidance masks
    lg = logits.clone()
    xgr.apply_token_bitmask_inplace(lg, bm, indices=constrained)
    r["xgr_kernel_on_llg_mask_check"] = check(before, lg, None)
    res["llguidance"] = r

    # --- outlines-core: no batch fill; one row at a time via Guide.write_mask_into
    ocl = OutlinesCoreLib()
    ocl.build(vocab_size=PADDED_VOCAB)
    idx = ocl.compile(S["b_nested"])
    gs = [ocl.matcher(idx) for _ in constrained]
    bm = ocl.alloc(rows)
    r = {"bitmask_shape": list(bm.shape)}
    t0 = now()
    try:
        for gd, i in zip(gs, constrained, strict=True):
            ocl.fill(gd, bm, i)
        r["per_row_fill_ms"] = round((now() - t0) * 1e3, 3)
    except BaseException as e:
        r["fill_error"] = err(e)
    try:
        import outlines_core.kernels.torch as okt
        lg = before.clone()
        # okt.apply_token_bitmask_inplace masks ALL rows; unconstrained rows must be left as -1
        a = now()
        okt.apply_token_bitmask_inplace(lg, bm)
        r["oc_torch_compile_apply_first_call_s"] = round(now() - a, 3)
        r["oc_apply_check"] = check(before, lg, None)
        try:
            okt.fill_next_token_bitmask(gs[0], bm[0:1])
            r["oc_fill_next_token_bitmask_row_view_ok"] = True
        except Exception as e:
            r["oc_fill_next_token_bitmask_row_view_error"] = err(e)
        try:
            okt.fill_next_token_bitmask(gs[0], bm)
        except Exception as e:
            r["oc_fill_batch_error"] = err(e)
    except Exception as e:
        r["oc_apply_error"] = err(e)
    res["outlines-core"] = r
    res["cuda_available_here"] = torch.cuda.is_available()
    return res


def pypi_release_info():
    """Release date of the installed version, from PyPI's JSON API (best effort, 10 s timeout)."""
    import urllib.request
    out = {}
    for p in ["xgrammar", "llguidance", "outlines-core"]:
        v = R["versions"].get(p)
        try:
            with urllib.request.urlopen(f"https://pypi.org/pypi/{p}/json", timeout=10) as f:
                d = json.load(f)
            files = d["releases"].get(v) or []
            out[p] = {"version": v, "latest_on_pypi": d["info"]["version"],
                      "upload_time": min(u["upload_time"] for u in files) if files else None,
                      "n_releases": len(d["releases"]), "project_urls": d["info"].get("project_urls")}
        except Exception as e:
            out[p] = {"version": v, "error": str(e)[:200]}
    return out


INSTALL_NOTES = [
    "venv created with /root/.pyenv/versions/3.11.7/bin/python3.11 (same interpreter as /work/main/.venv); a .pth "
    "file adds /work/main/.venv/lib/python3.11/site-packages read-only (torch 2.13.0+cpu, transformers 5.24.0, "
    "pydantic 2.14.4, numpy).",
    "pip install --no-deps xgrammar==0.2.9 llguidance==1.9.1 outlines-core==0.2.14 apache-tvm-ffi==0.1.15.post2. "
    "PyPI's newest xgrammar is 0.2.9 (not 0.2.8). All three have cp311 (or abi3) manylinux x86_64 wheels.",
    "--no-deps was used because xgrammar declares 'triton' (285.8 MB wheel) as an unconditional dependency on "
    "Linux x86_64; it is only needed for the CUDA bitmask kernel (a CUDA torch wheel already pulls triton in). "
    "xgrammar imports and works on CPU without it. Its other deps (apache-tvm-ffi, pydantic, torch, transformers, "
    "numpy, typing-extensions) are satisfied; no torch/transformers up/downgrade was requested by any package.",
    "llguidance and outlines-core have no runtime dependencies (torch/transformers optional helpers).",
]


def main():
    libs = [XGrammarLib(), LLGuidanceLib(), OutlinesCoreLib()]
    only = sys.argv[1:]
    for lib in libs:
        if only and lib.name not in only:
            continue
        t0 = now()
        print(f"== {lib.name}", flush=True)
        R["libs"][lib.name] = eval_lib(lib)
        R["libs"][lib.name]["eval_wall_s"] = round(now() - t0, 2)
        print(f"   done in {now() - t0:.1f}s", flush=True)
        with open(OUT, "w") as f:
            json.dump(R, f, indent=1, default=str)
    if not only or "pypi" in only:
        R["release_info"] = pypi_release_info()
    R["install_notes"] = INSTALL_NOTES
    if not only or "apply" in only:
        print("== apply tests", flush=True)
        try:
            R["apply"] = apply_tests()
        except Exception as e:
            R["apply"] = {"error": err(e), "trace": traceback.format_exc()}
    with open(OUT, "w") as f:
        json.dump(R, f, indent=1, default=str)
    print("wrote", OUT)


if __name__ == "__main__":
    main()

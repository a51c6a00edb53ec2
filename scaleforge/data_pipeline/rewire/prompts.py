"""The two rewrite prompts and how a reply becomes a rewrite (or a drop reason).

`guided` follows the structure REWIRE describes (Nguyen et al. 2025, section 3): the document is
framed as a draft, the model infers the task, reasons as the best-suited expert with a few guiding
questions, then writes an improved version that keeps the useful details and is not shorter,
between explicit tags; only the tagged text is kept (an unclosed tag runs to the end of the reply). `direct` is for small local models, which
(measured with SmolLM2-135M-Instruct) never close the guided prompt's tags: the whole reply is the
rewrite.
"""

from __future__ import annotations

OPEN_TAG = "<improved_document>"
CLOSE_TAG = "</improved_document>"

GUIDED = f"""Below is a draft written by an AI assistant. Your job is to turn it into a better text.

First, work out what task the draft was trying to accomplish, and decide which kind of expert
would be best placed to do that task well. Then think as that expert, inside <reasoning> and
</reasoning>, about questions such as: What is the core problem or purpose here? Can it be broken
into simpler parts? Are there other ways to approach it? Is the draft on the right track, and what
is it missing? What would a step-by-step plan for a stronger version look like?

Finally, write the improved text between {OPEN_TAG} and {CLOSE_TAG}. It must:
- keep the useful facts and details of the draft;
- be at least as long as the draft;
- be well organised, coherent and clearly formatted, with noise and boilerplate removed;
- sound like an expert in its own voice, without mentioning the draft or these instructions.
Do not add filler or commentary outside the tags.

Draft:
{{document}}"""

DIRECT = """Rewrite the text below so that it reads clearly and is well organised. Keep every fact \
and detail, do not make it shorter, and reply with the rewritten text only.

{document}"""

TEMPLATES = {"guided": GUIDED, "direct": DIRECT}


def messages(variant: str, document: str) -> list[dict]:
    """The chat request for one document: a single user turn."""
    return [{"role": "user", "content": TEMPLATES[variant].replace("{document}", document)}]


def extract(variant: str, reply: str) -> tuple[str | None, str | None]:
    """(rewrite, None) or (None, drop reason). `guided` keeps only the text after the last opening
    tag, up to the closing tag or, when the model never wrote it, to the end of the reply (the
    length and repetition rules still judge that text)."""
    if variant == "guided":
        start = reply.rfind(OPEN_TAG)
        if start < 0:
            return None, "no_tags"
        end = reply.find(CLOSE_TAG, start)
        reply = reply[start + len(OPEN_TAG) : end if end >= 0 else len(reply)]
    text = reply.strip()
    if not text:
        return None, "empty"
    return text, None

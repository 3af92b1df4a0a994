"""The prompt: a template with {liked}, {disliked} and {target}, filled from one sample.

The model's answer is the next token, " Yes" or " No", read at the last prompt token; a template
therefore ends where the answer starts ("Answer:"). The default is TALLRec's trained wording
(Bao et al. 2023), which measured better than fedsim's earlier wording on the same rows (README,
"Why the recommender did not learn").
"""

TALLREC_TEMPLATE = (
    'Given the user\'s preference and unpreference, identify whether the user will like the target '
    'movie by answering "Yes." or "No.".\n'
    "User Preference: {liked}\n"
    "User Unpreference: {disliked}\n"
    'Whether the user will like the target movie "{target}"?\n'
    "Answer:"
)

# fedsim's wording before TALLRec's became the default (kept for the lever table and old configs).
PLAIN_TEMPLATE = (
    'Given the user\'s liked and disliked movies, decide whether the user will like the target movie. '
    'Answer "Yes" or "No".\n'
    "Liked: {liked}\n"
    "Disliked: {disliked}\n"
    'Target movie: "{target}"\n'
    "Answer:"
)

# TALLRec's wording plus the target's like-rate over the train split ({target_rate}, e.g. "72%"):
# the item signal the popularity baseline uses, which the model cannot read off a title alone.
TALLREC_RATE_TEMPLATE = TALLREC_TEMPLATE.replace(
    '"{target}"?\n', '"{target}" (liked by {target_rate} of its viewers)?\n')

DEFAULT_TEMPLATE = TALLREC_TEMPLATE
# data.prompt may name one of these instead of spelling a template out.
NAMED = {"tallrec": TALLREC_TEMPLATE, "tallrec_rate": TALLREC_RATE_TEMPLATE, "plain": PLAIN_TEMPLATE}
FIELDS = ("liked", "disliked", "target", "target_rate")
# Words a word-level tokenizer (the tiny test model) must know besides the template and the titles.
EXTRA_WORDS = 'Yes No none "'


def prompt_template(cfg) -> str:
    """The run's template: data.prompt (a template or a name in NAMED), or the default."""
    prompt = cfg.data.prompt
    return DEFAULT_TEMPLATE if prompt is None else NAMED.get(prompt, prompt)


def check_template(template: str) -> None:
    """A template must name {target}; any other placeholder is a typo. Raises ValueError."""
    import string

    if template in NAMED:
        return
    names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    unknown = names - set(FIELDS)
    if unknown:
        raise ValueError(f"data.prompt: unknown placeholder(s) {sorted(unknown)}; use {{liked}}, {{disliked}}, {{target}}, {{target_rate}}")
    if "target" not in names:
        raise ValueError("data.prompt: the template must contain {target} (the item to score), "
                         f"or be one of the named templates {sorted(NAMED)}")


def _titles(titles) -> str:
    return ", ".join(f'"{t}"' for t in titles) if len(titles) else "none"


def render_prompt(liked, disliked, title: str, template: str = DEFAULT_TEMPLATE, target_rate: float | None = None) -> str:
    rate = "unknown" if target_rate is None else f"{target_rate:.0%}"
    return template.format(liked=_titles(liked), disliked=_titles(disliked), target=title, target_rate=rate)


def render_prompts(rows, template: str = DEFAULT_TEMPLATE) -> list[str]:
    """One prompt per row of a samples frame (columns liked, disliked, title, target_rate)."""
    rates = rows["target_rate"] if "target_rate" in rows else [None] * len(rows)
    return [render_prompt(a, b, t, template, r) for a, b, t, r in zip(rows["liked"], rows["disliked"], rows["title"], rates)]

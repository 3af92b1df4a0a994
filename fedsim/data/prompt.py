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

DEFAULT_TEMPLATE = TALLREC_TEMPLATE
FIELDS = ("liked", "disliked", "target")
# Words a word-level tokenizer (the tiny test model) must know besides the template and the titles.
EXTRA_WORDS = 'Yes No none "'


def prompt_template(cfg) -> str:
    """The run's template: data.prompt, or the default."""
    return cfg.data.prompt if cfg.data.prompt is not None else DEFAULT_TEMPLATE


def check_template(template: str) -> None:
    """A template must name {target}; any other placeholder is a typo. Raises ValueError."""
    import string

    names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    unknown = names - set(FIELDS)
    if unknown:
        raise ValueError(f"data.prompt: unknown placeholder(s) {sorted(unknown)}; use {{liked}}, {{disliked}}, {{target}}")
    if "target" not in names:
        raise ValueError("data.prompt: the template must contain {target} (the item to score)")


def _titles(titles) -> str:
    return ", ".join(f'"{t}"' for t in titles) if len(titles) else "none"


def render_prompt(liked, disliked, title: str, template: str = DEFAULT_TEMPLATE) -> str:
    return template.format(liked=_titles(liked), disliked=_titles(disliked), target=title)

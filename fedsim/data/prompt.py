"""The TALLRec prompt: instruction, the user's liked and disliked items, the target, "Answer:".

The model's answer is the next token: " Yes" or " No"; the prompt therefore must end exactly
with "Answer:" so that the answer position is the last prompt token.
"""

INSTRUCTION = (
    "Given the user's liked and disliked movies, decide whether the user will like the "
    'target movie. Answer "Yes" or "No".'
)


def _titles(titles) -> str:
    return ", ".join(f'"{t}"' for t in titles) if len(titles) else "none"


def render_prompt(liked, disliked, title: str) -> str:
    return (
        f"{INSTRUCTION}\n"
        f"Liked: {_titles(liked)}\n"
        f"Disliked: {_titles(disliked)}\n"
        f'Target movie: "{title}"\n'
        "Answer:"
    )

"""Expense-report coding: a generated domain-adaptation dataset.

Each example is one line an employee of a (fictional) bank, Northwind Bank, wrote on an expense
report — what was bought, the amount, sometimes a note — to be coded to a general-ledger account and
given an approval level under house rules that a base model cannot know. The answer has one exact
form, `category: <GL account>; approval: <level>` (about 12 tokens: the tokenizer splits the
account code into single digits).

House rules
-----------
GL account, from what the expense is about:

    6110 Travel            taxis, ride-hailing, trains, flights, rental cars, airport shuttles
    6120 Meals             team lunches, working dinners, breakfast meetings, catering
    6130 Lodging           hotel stays, serviced apartments, short-term rentals
    6210 Software          licences, subscriptions, seats and plan upgrades of software products
    6220 Training          courses, workshops, seminars, certification exams
    6310 Office Supplies   toner, paper, markers, stationery, small desk equipment

Approval level, the first rule that applies:

    CFO       compliance exposure: the line mentions a government official, a gift to a client, or
              alcohol at a client event
    Director  an amount of $2,500 or more
    Manager   an amount of $250 or more, or a line flagged "out of policy" or "no receipt"
    Auto      everything else

What the employee says about timing ("please reimburse this month") or how they paid does not
count: it appears at the same rate at every level. Account and approval level are independent;
small amounts are $5-$150, medium ones $400-$1,500 and large ones $4,000-$40,000, so neither
threshold is a knife edge a 135M model has to learn digit by digit. A line carries the cues of one
rule only (a CFO line always has a small amount and no policy flag), so the labels test that each
rule is known, not the precedence between rules; lines without a rule's cue carry its look-alikes
instead (a client visit or soft drinks for CFO, "receipt attached" or "within policy" for Manager).

Generalisation
--------------
Each account's expense description is a frame x slot value (6 x 6). One sixth of the combinations
are held out: validation and test lines use only those, training lines never do, so every frame
and every slot value is seen in training but no test description is. Three phrasings of the CFO
cue (one per kind: official, client gift, alcohol) and one of the Manager flag appear only in
validation/test. Line texts are unique across splits.

Generation is seeded and uses only `random.Random` with integer seeds (stable across Python
versions), so `python -m nemo_adapt.data.domains.expenses --out datasets/expenses` rewrites the
committed files byte for byte.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from nemo_adapt.data.domains import generate_splits, label_shares, run_cli, write_jsonl_splits

ACCOUNTS = ("6110 Travel", "6120 Meals", "6130 Lodging", "6210 Software", "6220 Training", "6310 Office Supplies")
"""Allowed GL accounts, in the order the instructions list them."""
APPROVALS = ("CFO", "Director", "Manager", "Auto")
"""Allowed approval levels, highest first."""
DIRECTOR_THRESHOLD = 2_500
"""Amounts at or above this (in dollars) need at least a Director's approval."""
MANAGER_THRESHOLD = 250
"""Amounts at or above this (in dollars) need at least a Manager's approval."""

SYSTEM_PROMPT = (
    "You code expense-report lines for Northwind Bank. Reply with exactly one line in the "
    "form: category: <GL account>; approval: <level>\n"
    f"GL accounts: {', '.join(ACCOUNTS)}.\n"
    "Approval levels: CFO (highest), Director, Manager, Auto (no approval needed)."
)
"""The instructions every example (and the prompt-only baseline) gets as its system message."""

SPLIT_SIZES = {"train": 2000, "validation": 200, "test": 200}
"""Default number of examples per split."""

# --- expense descriptions: frames x slot values, per account ------------------------------------
ITEMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "6110 Travel": (
        (
            "{x} from JFK to the Midtown office",
            "{x} to the Boston branch for the quarterly review",
            "{x} back from the Chicago conference",
            "{x} between our two Dallas offices",
            "{x} to meet the external auditors in Philadelphia",
            "{x} home after the late-night system cutover",
        ),
        ("Uber", "taxi", "Amtrak ticket", "economy flight", "rental car", "airport shuttle"),
    ),
    "6120 Meals": (
        (
            "{x} during the Q3 planning offsite",
            "{x} for the audit preparation team",
            "{x} on the Denver branch visit",
            "{x} while working late on the month-end close",
            "{x} for the new-hire orientation day",
            "{x} with the payments engineering team",
        ),
        ("team lunch", "working dinner", "breakfast meeting", "coffee and pastries", "sandwich platter",
         "pizza order"),
    ),
    "6130 Lodging": (
        (
            "{x} in Boston for the quarterly review",
            "{x} near the Chicago conference venue",
            "{x} for the Dallas data-centre migration",
            "{x} during the Seattle branch audit",
            "{x} in Atlanta for the regional sales kickoff",
            "{x} in Denver while visiting the operations team",
        ),
        ("two nights at the Hilton", "hotel stay", "Airbnb apartment", "one night at the Marriott",
         "serviced apartment for a week", "airport hotel room"),
    ),
    "6210 Software": (
        (
            "{x} annual licence for the design team",
            "{x} subscription renewal",
            "{x} seats for the new analysts",
            "upgrade of our {x} plan to the business tier",
            "{x} add-on for the reporting project",
            "{x} monthly subscription for one user",
        ),
        ("Figma", "JetBrains", "Slack", "Zoom", "Adobe Acrobat", "Tableau"),
    ),
    "6220 Training": (
        (
            "{x} for my professional development plan",
            "registration fee for the {x}",
            "{x} for two junior analysts",
            "{x} recommended in my annual review",
            "{x} booked through the learning portal",
            "online {x} for the risk team",
        ),
        ("AWS certification exam", "Python course", "SQL workshop", "leadership seminar",
         "project-management certification", "public-speaking class"),
    ),
    "6310 Office Supplies": (
        (
            "{x} for the third-floor office",
            "replacement {x} for the branch front desk",
            "{x} ordered from Staples",
            "{x} for the new starters' desks",
            "bulk order of {x}",
            "{x} for the operations team",
        ),
        ("toner cartridges", "printer paper", "whiteboard markers", "desk organisers", "label-printer tape",
         "notebooks and pens"),
    ),
}


def is_heldout_item(frame: int, value: int) -> bool:
    """Whether a description combination is reserved for validation/test (one per frame: 1/6 of them).

    Args:
        frame: frame index.
        value: slot value index.

    Returns:
        True for held-out combinations.
    """
    return (frame + value) % 6 == 0


# --- approval cues --------------------------------------------------------------------------------
# (train phrasings, phrasings used only in validation/test)
COMPLIANCE_CUES = (
    (
        "attended by a government official",
        "guest was a city council member",
        "hosted a state treasury official",
        "gift for a client",
        "client gift basket",
        "includes wine at the client dinner",
        "bar tab at the client event",
    ),
    (
        "a customs official joined us",
        "holiday gift sent to a client",
        "champagne for the client reception",
    ),
)
POLICY_FLAGS = (
    (
        "out of policy",
        "no receipt",
        "flagged as out of policy",
        "no receipt (the vendor never sent one)",
        "booked out of policy (nothing else was available)",
    ),
    ("no receipt (the paper copy got lost)",),
)
COMPLIANCE_LOOKALIKES = (
    "client visit",
    "for the Harbor client project",
    "soft drinks only",
    "met a vendor's sales rep",
)
POLICY_LOOKALIKES = (
    "receipt attached",
    "within policy",
    "itemised receipt attached",
    "pre-approved budget line",
)
TIMING_NOISE = (
    "please reimburse this month",
    "urgent reimbursement please",
    "paid with my personal card",
    "paid on the corporate card",
)
# Target approval mix: realistic (most lines are routine) without letting one class dominate.
APPROVAL_WEIGHTS = {"CFO": 0.2, "Director": 0.2, "Manager": 0.3, "Auto": 0.3}
TIMING_NOISE_RATE = 0.2


def _amount(rng: random.Random, size: str) -> str:
    lo, hi = {"small": (5, 150), "medium": (400, 1_500), "large": (4_000, 40_000)}[size]
    if rng.random() < 0.5:
        return f"${rng.randrange(lo * 100, hi * 100 + 1) / 100:,.2f}"
    return f"${rng.randrange(lo, hi + 1):,}"


def answer_text(category: str, approval: str) -> str:
    """The exact answer string for a label.

    Args:
        category: one of ACCOUNTS.
        approval: one of APPROVALS.

    Returns:
        `category: <category>; approval: <approval>`.
    """
    return f"category: {category}; approval: {approval}"


def make_line(rng: random.Random, heldout: bool) -> tuple[str, str, str]:
    """One expense line and its label.

    Args:
        rng: the random source.
        heldout: draw description combinations and cue phrasings for validation/test (True) or training.

    Returns:
        (line text, GL account, approval level).
    """
    category = rng.choice(ACCOUNTS)
    frames, values = ITEMS[category]
    combos = [(f, v) for f in range(len(frames)) for v in range(len(values))
              if is_heldout_item(f, v) == heldout]
    f, v = rng.choice(combos)
    item = frames[f].format(x=values[v])
    if item[0].islower():
        item = item[0].upper() + item[1:]

    approval = rng.choices(APPROVALS, weights=[APPROVAL_WEIGHTS[a] for a in APPROVALS])[0]
    # A line carries the cues of its own rule only (see "House rules"): CFO and Auto lines have a small
    # amount and no policy flag, Director lines a large amount, Manager lines a medium amount, a flag or both.
    compliance, size, flagged = approval == "CFO", "small", False
    if approval == "Director":
        size = "large"
    elif approval == "Manager":
        kind = rng.choices(("amount", "flag", "both"), weights=(0.4, 0.4, 0.2))[0]
        size = "medium" if kind in ("amount", "both") else "small"
        flagged = kind in ("flag", "both")

    def phrase(pool: tuple[tuple[str, ...], tuple[str, ...]]) -> str:
        # Eval splits draw from all phrasings, so some lines carry a cue phrased as never seen.
        return rng.choice(pool[0] + pool[1] if heldout else pool[0])

    notes = [_amount(rng, size)]
    if compliance:
        notes.append(phrase(COMPLIANCE_CUES))
    elif rng.random() < 0.4:
        notes.append(rng.choice(COMPLIANCE_LOOKALIKES))
    if flagged:
        notes.append(phrase(POLICY_FLAGS))
    elif rng.random() < 0.4:
        notes.append(rng.choice(POLICY_LOOKALIKES))
    if rng.random() < TIMING_NOISE_RATE:
        notes.append(rng.choice(TIMING_NOISE))
    rng.shuffle(notes)
    # One line as written on a report: the description first, then amount and notes in any order.
    return ", ".join([item, *notes]), category, approval


def make_record(line: str, category: str, approval: str) -> dict:
    """A chat record: instructions, the expense line, the answer.

    Args:
        line: the expense line text.
        category: its GL account.
        approval: its approval level.

    Returns:
        `{"messages": [system, user, assistant]}`.
    """
    return {"messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": line},
        {"role": "assistant", "content": answer_text(category, approval)},
    ]}


def generate(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """All splits, deterministically for a seed (texts unique across all splits).

    Args:
        seed: generator seed.
        sizes: split -> number of examples (default SPLIT_SIZES).

    Returns:
        split -> chat records.
    """
    return generate_splits(make_line, make_record, dict(SPLIT_SIZES if sizes is None else sizes), seed)


def write_splits(out_dir: str | Path, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Generate and write `{train,validation,test}.jsonl` under `out_dir` (created if missing).

    Returns:
        split -> written file.
    """
    return write_jsonl_splits(out_dir, generate(seed, sizes))


def label_of(record: dict) -> tuple[str, str]:
    """(GL account, approval level) parsed back from a record's answer.

    Args:
        record: a chat record as written by `make_record`.

    Returns:
        The label.
    """
    answer = record["messages"][-1]["content"]
    category_part, approval_part = answer.split("; ")
    return category_part.removeprefix("category: "), approval_part.removeprefix("approval: ")


def distribution(records: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Label shares of a split: per account, per approval level, per (account, level) pair.

    Returns:
        `{"category": {...}, "approval": {...}, "pair": {"<category> / <approval>": share}}`, shares in [0, 1].
    """
    return label_shares([label_of(r) for r in records], ("category", "approval"))


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: write the splits and print their label distribution."""
    run_cli(argv, __doc__.split("\n")[0], "datasets/expenses", SPLIT_SIZES, write_splits, distribution, "approval")


if __name__ == "__main__":
    main()

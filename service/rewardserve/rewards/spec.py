"""The `composite:` section of a reward model's manifest: named parts with weights.

    composite:
      parts:
        - {name: harmless, model: minilm-hh-harmless, weight: 1.0, use: normalized}
        - {name: brevity, rule: length_penalty, weight: 0.2, params: {target: 120, per: 50}}
        - {name: format, rule: regex, weight: 0.5, params: {pattern: '^[A-Z]'}}
        - {name: correct, rule: exact_match, weight: 2.0, params: {normalize: true}}

A composite's reward is Σ weight · value over its parts. What the manifest alone can check is
checked here (unique names, one of model/rule, rule parameters, finite weights); that model
parts name reward models of the repository which are not composites themselves is checked
against the repository (rewardserve.engine.composite.check_parts).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from rewardserve.rewards.rules import NEEDS_LABEL, RULES, Rule, RuleName

PART_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class Part(BaseModel):
    """One named part: a hosted reward model (`model`) or a rule reward (`rule`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=PART_NAME)
    """Unique within the composite; the key of the part in results and request weights."""
    weight: Annotated[float, Field(allow_inf_nan=False)] = 1.0
    """Multiplies the part's value in the total (negative weights subtract)."""
    model: str | None = None
    """A reward model of the repository, by name or alias (not a composite)."""
    use: Literal["normalized", "raw"] | None = None
    """Model parts: its normalized reward ((r − mean)/std, the default, so parts of
    different models share a scale) or its raw reward."""
    rule: RuleName | None = None
    """A rule reward (rewardserve.rewards.rules): length_penalty, regex or exact_match."""
    params: dict[str, Any] | None = None
    """Rule parts: the rule's parameters (see its class in rewardserve.rewards.rules)."""
    _rule: Rule | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _one_kind(self) -> Part:
        if (self.model is None) == (self.rule is None):
            raise ValueError(f"part '{self.name}': give exactly one of: model, rule")
        if self.model is not None and self.params is not None:
            raise ValueError(f"part '{self.name}': 'params' are for rule parts")
        if self.rule is not None:
            if self.use is not None:
                raise ValueError(f"part '{self.name}': 'use' is for model parts")
            try:
                self._rule = RULES[self.rule].model_validate(self.params or {})  # type: ignore[assignment]
            except ValidationError as e:
                first = e.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                msg = first["msg"].removeprefix("Value error, ")
                raise ValueError(
                    f"part '{self.name}' ({self.rule}): params.{where}: {msg}"
                    if where
                    else f"part '{self.name}' ({self.rule}): params: {msg}"
                ) from None
        return self

    @property
    def scale(self) -> Literal["normalized", "raw"]:
        return self.use or "normalized"

    @property
    def needs_label(self) -> bool:
        return self.rule in NEEDS_LABEL

    def rule_value(self, prompt: str, response: str, label: str | None) -> float:
        assert self._rule is not None, "a model part has no rule"
        return self._rule.value(prompt, response, label)


class CompositeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    parts: list[Part] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> CompositeSpec:
        seen: set[str] = set()
        for p in self.parts:
            if p.name in seen:
                raise ValueError(f"part name '{p.name}' is used twice")
            seen.add(p.name)
        return self

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.parts]

    @property
    def model_parts(self) -> list[Part]:
        return [p for p in self.parts if p.model is not None]

    def weights(self, override: dict[str, float] | None = None) -> dict[str, float]:
        """Each part's weight, the request's `override` (by part name) on top."""
        return {p.name: p.weight for p in self.parts} | (override or {})

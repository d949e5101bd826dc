"""The toy benchmark's query instructions: four M-BEIR-like prompts per task.

Realistic wording, one row per (dataset, query modality, candidate modality) as in UniIR's
`query_instructions.tsv`, so instruction tuning and the instruction lookup run as on M-BEIR.
"""

from __future__ import annotations

from umarvel_ray.data import catalogue, instructions

# Realistic M-BEIR-like wording, 4 prompts per (dataset, query modality, candidate modality).
INSTRUCTIONS: dict[str, tuple[str, str, str, str]] = {
    "visualnews_task0": (
        "Identify the news-related image in line with the described event.",
        "Display an image that best captures the following caption from a news post.",
        "Retrieve an image that matches the given news caption.",
        "Find the news photo that goes with this caption.",
    ),
    "mscoco_task0": (
        "Identify the image which is described by the given caption.",
        "Retrieve an everyday image that matches the caption.",
        "Find the picture that the following description refers to.",
        "Show me an image that fits this caption.",
    ),
    "fashion200k_task0": (
        "Based on the following fashion description, retrieve the best matching image.",
        "Find the product image that matches this description.",
        "Match the provided description to the correct fashion item photo.",
        "Retrieve an image of the item described below.",
    ),
    "webqa_task1": (
        "Retrieve passages from Wikipedia that provide answers to the following question.",
        "Find a Wikipedia paragraph that answers the question.",
        "Identify the text snippet that best answers this question.",
        "Provide the passage that contains the answer to the query.",
    ),
    "edis_task2": (
        "Find a news image that matches the provided caption and its corresponding headline.",
        "Retrieve a news photo and headline pair that fits the caption.",
        "Identify the news image with a headline that corresponds to this text.",
        "Find the image and headline of the news story described.",
    ),
    "webqa_task2": (
        "Find a Wikipedia image that answers this question.",
        "Retrieve an image with its caption that answers the question.",
        "Provide an image and description from Wikipedia that answer the query.",
        "Identify the captioned image that responds to this question.",
    ),
    "visualnews_task3": (
        "Find a caption for the news in the given photo.",
        "Retrieve the news caption that describes this image.",
        "Identify the caption written for this news photo.",
        "Produce the matching news caption for the image.",
    ),
    "mscoco_task3": (
        "Find an image caption describing the following everyday image.",
        "Retrieve a caption that describes the given picture.",
        "Identify the description that matches this image.",
        "Match the image to its caption.",
    ),
    "fashion200k_task3": (
        "Find a product description for the fashion item in the image.",
        "Retrieve the description of the item shown.",
        "Identify the text that describes this product photo.",
        "Match this fashion image with its product description.",
    ),
    "nights_task4": (
        "Find a day-to-day image that looks similar to the provided image.",
        "Retrieve an image that is visually alike to the given one.",
        "Identify the picture that best resembles this image.",
        "Find another photo of the scene shown in this image.",
    ),
    "oven_task6": (
        "Retrieve a Wikipedia paragraph that provides an answer to the given query about the image.",
        "Find the encyclopedia entry about the object the question asks about in the image.",
        "Determine the entity in the image the question refers to and retrieve its description.",
        "Using the image and question, find the passage that names the entity.",
    ),
    "infoseek_task6": (
        "Retrieve a Wikipedia paragraph that provides an answer to the given query about the image.",
        "Find the passage that answers the question about this image.",
        "Using the image, retrieve the text that answers the question.",
        "Identify the statement that answers this question about the picture.",
    ),
    "fashioniq_task7": (
        "Find a fashion image that aligns with the reference image and style note.",
        "Retrieve the product photo that looks like the reference but with the described changes.",
        "Given the item and the requested changes, find the matching fashion image.",
        "Identify the fashion item image that fits the reference after applying the note.",
    ),
    "cirr_task7": (
        "Retrieve a day-to-day image that aligns with the modification instructions of the provided image.",
        "Find the image that results from applying the described change to this picture.",
        "Modify the reference image as instructed and retrieve the matching picture.",
        "Identify the picture that shows the reference scene after the edit.",
    ),
    "oven_task8": (
        "Retrieve a Wikipedia image-description pair that provides evidence for the question of this image.",
        "Find the entity image and name that answer the question about this picture.",
        "Identify the reference image with its description that matches the queried object.",
        "Using the image and question, retrieve the matching entity image and text.",
    ),
    "infoseek_task8": (
        "Retrieve a Wikipedia image-description pair that provides evidence for the question of this image.",
        "Find an image with a passage that answers the question about the picture.",
        "Identify the image and statement that answer this question.",
        "Using the picture, retrieve the illustrated passage that answers the query.",
    ),
}


def instruction_rows() -> list[instructions.InstructionRow]:
    """The 16 instruction rows in MBEIR_TASKS order."""
    return [
        instructions.InstructionRow(t.query_modality, t.cand_modality, t.dataset, t.dataset_id, INSTRUCTIONS[t.name])
        for t in catalogue.MBEIR_TASKS
    ]

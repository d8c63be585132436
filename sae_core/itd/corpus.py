"""The prompt corpus that ships for training text-encoder SAEs, and the script that writes it.

``python -m sae_core.itd.corpus`` writes ``sae_core/itd/data/text_sae_corpus.txt.gz`` from the word lists
below, deterministically (a seeded generator; gzip without a time stamp): the same file every time. The
lists are this project's own, written for it: everyday subjects, settings, media and styles, the names of
painters as a style reference (names are facts, not works), generic descriptions of famous people (no
real person is named), generic unsafe phrasings (nudity, violence) at the level of a content warning, and
caption-like sentences. They are what ItD's tasks calibrate on: styles and artists, celebrities, nudity, and
ordinary prompts to keep. The corpus is released under the repository's licence (Apache-2.0); see
``data/README.md``.

:func:`default_corpus` reads the shipped file (with :func:`sae_core.prompts.read_prompt_file`, the rule every
prompt file goes through).
"""

from __future__ import annotations

import gzip
import io
import random
import sys
from pathlib import Path

from ..prompts import read_prompt_file

__all__ = ["CORPUS_PATH", "CORPUS_SIZE", "build_corpus", "default_corpus", "write_corpus"]

CORPUS_PATH = Path(__file__).resolve().parent / "data" / "text_sae_corpus.txt.gz"
"""The shipped corpus."""

CORPUS_SIZE = 40_000
"""Prompts in the shipped corpus."""

SUBJECTS = """a red fox|an old lighthouse|a bowl of fruit|a mountain lake|a cat sleeping on a windowsill|a wooden boat
|a castle on a hill|a field of sunflowers|a city skyline|a vintage car|a dragon|an astronaut|a robot|a knight in armor
|a young woman reading a book|an old man with a beard|a little girl with a balloon|a street musician|a ballerina
|a samurai|a wizard|a mermaid|a fairy|a cowboy on a horse|a sailor|a farmer in a wheat field|a chef in a kitchen
|a scientist in a lab|a bride in a white dress|a soldier|a monk|a queen on a throne|a pirate ship|a steam locomotive
|a hot air balloon|a bicycle leaning on a wall|a cup of coffee|a stack of books|a vase of roses|a bowl of ramen
|a birthday cake|a glass of wine|a loaf of bread|a basket of apples|a teapot|an owl on a branch|a wolf howling
|a herd of elephants|a tiger in the jungle|a horse running|a flock of birds|a golden retriever|a black cat
|a white rabbit|a panda eating bamboo|a butterfly on a flower|a whale jumping out of the ocean|a jellyfish
|a koi pond|a hummingbird|a peacock|a polar bear|a deer in the snow|a lion resting|a parrot|a squirrel|a frog on a leaf
|a waterfall|a volcano|a desert with dunes|a snowy forest|a tropical beach|a canyon|a glacier|a rainbow over hills
|a thunderstorm|a starry sky|a full moon|a sunrise over the sea|an autumn forest|a cherry blossom tree|a bamboo forest
|a rice terrace|a village in the mountains|a busy market|a cathedral|a temple|a pagoda|a windmill|a bridge over a river
|a train station|a lonely road|a skyscraper|a cozy cabin|a lighthouse in a storm|a greenhouse|a library|a cafe
|a neon-lit alley|an abandoned factory|a space station|an alien planet|a futuristic city|a medieval town|a harbor
|a garden with a fountain|a chess board|a guitar|a piano|a violin|a clock tower|a pocket watch|a lantern|a candle
|a skull|a crown|a sword|a shield|a treasure chest|a map|a compass|a globe|a telescope|a typewriter|a camera
|a pair of shoes|a red dress|a leather jacket|a straw hat|an umbrella in the rain|a family having dinner
|children playing in a park|a couple dancing|a crowd at a concert|a man playing chess|a woman painting
|two friends laughing|a boy flying a kite|an old woman knitting|a firefighter|a nurse|a teacher in a classroom
|a football player|a tennis player|a surfer on a wave|a skier|a climber on a cliff|a runner in a marathon""".replace("\n", "").split("|")

SETTINGS = """at sunset|at dawn|at night|in the rain|in the snow|in a misty forest|on a busy city street|in a quiet village
|by the sea|on a mountain top|in a field of flowers|in the desert|under the stars|in a cozy room|in a dark cave
|in an ancient ruin|in a futuristic city|in outer space|underwater|in a garden|in a market|in a library|in a cafe
|on a rooftop|on a beach|in a meadow|by a river|in autumn|in spring|in winter|in summer|in the fog|during a storm
|in golden hour light|under neon lights|in a candlelit room|in a museum|on a stage|in a studio|in a kitchen
|in the countryside|in a jungle|on a frozen lake|in a snowy valley|in a castle hall|in a cathedral|at a train station
|in a subway|at a carnival|in a classroom""".replace("\n", "").split("|")

MEDIA = """oil painting|watercolor painting|pencil sketch|charcoal drawing|ink drawing|pastel drawing|acrylic painting
|digital painting|digital art|concept art|3d render|pixel art|vector illustration|children's book illustration
|comic book art|manga style|anime style|woodblock print|linocut|etching|engraving|mosaic|stained glass|tapestry
|fresco|graffiti|street art|poster|photograph|black and white photograph|polaroid photo|film photograph
|studio photograph|macro photograph|aerial photograph|long exposure photograph|cinematic still|sculpture|clay model
|paper cut art|origami|embroidery|low poly art|isometric illustration|blueprint|technical drawing|collage|sticker
|tattoo design|album cover|storybook illustration|matte painting|miniature painting|ceramic glaze|neon sign""".replace("\n", "").split("|")

STYLES = """impressionism|post-impressionism|expressionism|cubism|surrealism|pop art|art nouveau|art deco|baroque
|renaissance|rococo|romanticism|realism|minimalism|abstract art|fauvism|pointillism|futurism|constructivism|bauhaus
|ukiyo-e|gothic art|byzantine art|art brut|op art|vaporwave|cyberpunk|steampunk|solarpunk|synthwave|dark fantasy
|high fantasy|retro futurism|psychedelic art|folk art|naive art|tonalism|luminism|hyperrealism|photorealism
|lowbrow art|street photography|film noir|gothic horror|cottagecore|brutalism|art informel|color field painting
|hudson river school|pre-raphaelite""".replace("\n", "").split("|")

ARTISTS = """Vincent van Gogh|Claude Monet|Pablo Picasso|Rembrandt|Leonardo da Vinci|Michelangelo|Raphael|Johannes Vermeer
|Salvador Dali|Frida Kahlo|Gustav Klimt|Edvard Munch|Henri Matisse|Paul Cezanne|Paul Gauguin|Georges Seurat
|Pierre-Auguste Renoir|Edgar Degas|Camille Pissarro|Mary Cassatt|Berthe Morisot|Alfons Mucha|Egon Schiele
|Wassily Kandinsky|Piet Mondrian|Joan Miro|Marc Chagall|Rene Magritte|Andy Warhol|Roy Lichtenstein|Jackson Pollock
|Mark Rothko|Georgia O'Keeffe|Edward Hopper|Grant Wood|Norman Rockwell|J. M. W. Turner|John Constable
|Caspar David Friedrich|Francisco Goya|Diego Velazquez|El Greco|Titian|Sandro Botticelli|Caravaggio|Peter Paul Rubens
|Hieronymus Bosch|Pieter Bruegel|Albrecht Durer|Jan van Eyck|Katsushika Hokusai|Utagawa Hiroshige|Kitagawa Utamaro
|Amedeo Modigliani|Henri de Toulouse-Lautrec|Gustave Courbet|Jean-Francois Millet|Eugene Delacroix
|John Singer Sargent|James McNeill Whistler|Winslow Homer|Thomas Cole|Albert Bierstadt|Ivan Aivazovsky
|Ilya Repin|Arkhip Kuindzhi|Ivan Shishkin|William Turner|Dante Gabriel Rossetti|John William Waterhouse
|Arthur Rackham|Gustave Dore|Aubrey Beardsley|William Blake|Odilon Redon|Henri Rousseau|Paul Klee|Kazimir Malevich
|Amrita Sher-Gil|Tamara de Lempicka|Hilma af Klint|Zdzislaw Beksinski|Moebius|Beatrix Potter""".replace("\n", "").split("|")

ARTIST_TEMPLATES = ("Image in the style of {a}", "Art inspired by {a}", "Painting in the style of {a}",
                    "A reproduction of art by {a}", "A famous artwork by {a}", "{s} by {a}", "{s}, in the style of {a}",
                    "{s} {w}, painted by {a}", "a {m} of {s} in the style of {a}", "{a}")

PEOPLE = """a famous actor|a famous actress|a movie star|a pop star|a rock star|a rapper|a famous singer|a talk show host
|a news anchor|a well-known politician|a president|a prime minister|a royal princess|a king|a famous athlete
|a football star|a basketball star|a tennis champion|a supermodel|a fashion designer|a famous chef|a billionaire
|a tech entrepreneur|a famous scientist|a famous writer|a youtuber|an influencer|a comedian|a film director
|an opera singer""".replace("\n", "").split("|")

PEOPLE_TEMPLATES = ("A portrait of {p}", "A sketch of {p}", "An oil painting of {p}", "{p} in an official photo",
                    "An image capturing {p} at a public event", "{p} on the red carpet", "{p} giving an interview",
                    "a paparazzi photo of {p} {w}", "{p} on stage", "a magazine cover with {p}")

UNSAFE = """nudity|naked|nude|erotic|sexual|topless|a nude figure study|a naked person|a nude model posing|an erotic scene
|a sexy woman in lingerie|a shirtless man|a nude woman bathing|a naked man on a beach|an explicit scene|a pin-up
|a violent scene|a bloody battle|gore|a horror scene with blood|a gun pointed at the viewer|a knife fight|an explosion
|a war zone|a car crash|a dead body|a zombie attack|a drunk man|people smoking|drug use""".replace("\n", "").split("|")

UNSAFE_TEMPLATES = ("{u}", "{u}, {m}", "{u} {w}", "a {m} of {u}", "{u}, {st}, highly detailed", "{u} in the style of {a}")

QUALITY = """highly detailed|high resolution|4k|8k|sharp focus|soft lighting|dramatic lighting|cinematic lighting
|volumetric light|studio lighting|bokeh|intricate|masterpiece|award winning|trending on an art site|beautiful
|vibrant colors|muted colors|pastel colors|monochrome|wide angle|close-up|full body|portrait orientation
|symmetrical composition|rule of thirds|depth of field|film grain|hdr|octane render""".replace("\n", "").split("|")

COUNTS = ("a", "two", "three", "a group of", "several", "many", "a pair of", "a few")
CREATURES = ("dogs", "cats", "people", "children", "birds", "horses", "cows", "sheep", "men", "women", "elephants",
             "giraffes", "zebras", "ducks", "students", "tourists", "players", "friends", "cyclists", "workers")
ACTIONS = ("walking", "running", "sitting", "standing", "playing", "eating", "sleeping", "talking", "waiting", "riding",
           "swimming", "looking at the camera", "crossing the street", "resting", "dancing", "reading", "laughing")
PLACES = ("on the grass", "in a park", "on a street", "near a building", "on a beach", "in a field", "in a kitchen",
          "in a living room", "on a sidewalk", "by the water", "in the snow", "at a table", "on a bench",
          "in front of a store", "at the zoo", "on a farm", "in a parking lot", "on a train platform", "in an office")
OBJECTS = ("pizza", "banana", "laptop", "umbrella", "bus", "train", "airplane", "clock", "vase", "teddy bear", "kite",
           "skateboard", "surfboard", "motorcycle", "fire hydrant", "stop sign", "bench", "backpack", "suitcase",
           "frisbee", "toaster", "refrigerator", "television", "keyboard", "cell phone", "sandwich", "donut", "broccoli",
           "carrot", "hot dog", "goldfish", "tabby cat", "school bus", "sports car", "mailbox", "lemon", "strawberry",
           "mushroom", "acoustic guitar", "coffee mug", "sewing machine", "ambulance", "lawn mower", "park bench")

HEADER = """# Text-SAE training corpus of comfyui-concept-erasure ({n} prompts, one per line).
# Generated by `python -m sae_core.itd.corpus` from the project's own word lists (sae_core/itd/corpus.py):
# subjects, settings, media, styles, painters' names as style references, generic descriptions of famous
# people (no real person named) and generic unsafe phrasings, for ItD's style/celebrity/nudity calibration.
# Licence: Apache-2.0, as the repository. Lines starting with '#' are comments.
"""


def _choice(rng: random.Random, items) -> str:
    return items[rng.randrange(len(items))]


def _prompt(rng: random.Random) -> str:
    s, w, m, st = _choice(rng, SUBJECTS), _choice(rng, SETTINGS), _choice(rng, MEDIA), _choice(rng, STYLES)
    a, q, p, u = _choice(rng, ARTISTS), _choice(rng, QUALITY), _choice(rng, PEOPLE), _choice(rng, UNSAFE)
    kind = rng.random()
    if kind < 0.22:
        form = _choice(rng, ("{s} {w}", "{s}, {m}", "a {m} of {s} {w}", "{s} {w}, {m}, {q}", "{s}, {st}",
                             "{s} {w}, {st}, {q}", "a {st} {m} of {s}", "{s}"))
    elif kind < 0.42:
        form = _choice(rng, ARTIST_TEMPLATES)
    elif kind < 0.55:
        form = _choice(rng, PEOPLE_TEMPLATES)
    elif kind < 0.63:
        form = _choice(rng, UNSAFE_TEMPLATES)
    elif kind < 0.85:
        caption = f"{_choice(rng, COUNTS)} {_choice(rng, CREATURES)} {_choice(rng, ACTIONS)} {_choice(rng, PLACES)}"
        return caption.replace("a dogs", "a dog").replace("a cats", "a cat") if caption.startswith("a ") else caption
    else:
        form = _choice(rng, ("a photo of a {o}", "a {o}", "a close-up photo of a {o}", "a {m} of a {o}",
                             "a {o} {w}", "a drawing of a {o}"))
        return form.format(o=_choice(rng, OBJECTS), m=m, w=w)
    return form.format(s=s, w=w, m=m, st=st, a=a, q=q, p=p, u=u)


def build_corpus(n: int = CORPUS_SIZE, seed: int = 0) -> list[str]:
    """``n`` distinct prompts, in a seeded random order (deterministic)."""
    rng = random.Random(seed)
    seen: dict[str, None] = {}
    # every painter with every reference template first, so ItD's artist calibration prompts are all seen
    fixed = [t.format(a=a) for a in ARTISTS for t in ARTIST_TEMPLATES[:5]]
    fixed += [t.format(p=p) for p in PEOPLE for t in PEOPLE_TEMPLATES[:5]] + list(UNSAFE)
    for prompt in fixed:
        seen.setdefault(prompt, None)
    tries = 0
    while len(seen) < n:
        seen.setdefault(_prompt(rng), None)
        tries += 1
        if tries > 50 * n:
            raise RuntimeError(f"the word lists give fewer than {n} distinct prompts")
    prompts = list(seen)[:n]
    rng.shuffle(prompts)
    return prompts


def write_corpus(path: str | Path = CORPUS_PATH, n: int = CORPUS_SIZE, seed: int = 0) -> Path:
    """Write the corpus as gzip-compressed UTF-8 text (no time stamp, so the bytes are reproducible)."""
    path = Path(path)
    text = HEADER.format(n=n) + "\n".join(build_corpus(n, seed)) + "\n"
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(text.encode("utf-8"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


def default_corpus() -> list[str]:
    """The shipped corpus's prompts."""
    return read_prompt_file(CORPUS_PATH)


if __name__ == "__main__":
    out = write_corpus(sys.argv[1] if len(sys.argv) > 1 else CORPUS_PATH)
    print(f"wrote {out} ({out.stat().st_size} bytes)")

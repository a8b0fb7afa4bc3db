"""Common English words the tiny tokenizer must keep whole.

Fine-tuning recipes assume a real CLIP vocabulary: textual inversion initialises a new
embedding from a single-token word ("box", "toy", "cat"), DreamBooth prompts use class nouns
("a photo of sks dog"), and users write ordinary prompts. The tokenizer's BPE merges are learned
from the caption corpus plus this list, so every word below ends up as exactly one token.
"""

from __future__ import annotations

_WORDS = """
a an the of on in at to with and or for from by over under near behind above below beside
between into onto inside outside next is are this that it its some very
photo photograph picture image painting drawing sketch illustration render art artwork portrait
style styled cartoon anime realistic detailed closeup close up view scene shot poster logo icon
sticker pattern texture design print
dog dogs puppy cat cats kitten bird fish horse cow pig sheep rabbit bear lion tiger fox wolf
mouse duck owl frog monkey panda deer elephant animal pet
box toy toys ball doll robot car truck bus train plane boat bike bicycle cup mug bowl plate
bottle vase chair table bed sofa lamp clock book phone bag hat shoe shoes shirt dress jacket
glasses watch ring key door window house home building tower bridge castle city street road
tree trees flower flowers grass leaf plant garden forest park beach sea ocean lake river
mountain hill sky cloud clouds sun moon star stars rain snow fire water stone rock sand wood
man woman person people boy girl child baby face hand eye eyes head hair
food apple banana orange cake bread pizza coffee tea
shape shapes circle square triangle rectangle diamond cross heart oval line lines dot dots
stripe stripes striped checkered checkerboard grid spiral wave zigzag
red green blue yellow orange purple pink brown black white gray grey cyan magenta gold silver
color colour colored colorful bright dark light pale
big small large tiny little huge tall short long wide round flat new old young cute happy sad
beautiful pretty ugly soft hard hot cold wet dry clean dirty shiny plain simple fancy empty
full open closed fast slow high low
top bottom left right middle center centre corner side edge front back upper lower
background foreground
one two three four five many few
day night morning evening summer winter spring autumn
sitting standing running walking flying lying holding wearing playing eating looking
sks
"""


def common_words() -> list[str]:
    """The embedded word list, lower-case, de-duplicated, in a fixed order."""
    seen: dict[str, None] = {}
    for word in _WORDS.split():
        seen.setdefault(word.lower(), None)
    return list(seen)

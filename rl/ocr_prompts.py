"""Text-rendering training prompts that are not the OCR benchmark's.

Flow-GRPO's OCR test prompts (`assets/prompts/ocr_test.txt`, 1018) describe a scene holding a short text in double
quotes, the target the OCR reward reads for (`rewards/ocr_rule.py`). The training set here is built the same way from
parts written for it: scene templates (shop fronts, road and warning signs, book covers, t-shirts, mugs, labels,
screens, posters, cakes, chalkboard menus ...), each with the kinds of text it plausibly shows, and short English
phrases of those kinds (1 to 4 words) combined from the word lists below ("Miller's Bakery", "Bridge Out Ahead",
"Happy 40th Birthday").

`scripts/make_ocr_train_prompts.py` writes `assets/prompts/ocr_train.txt`: 5,000 distinct prompts, seed 2026. A drawn
prompt is left out when it equals a test prompt or when its target equals a test prompt's target as the reward compares
them (lower case, spaces removed); no target is used more than twice.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from rewards.ocr_rule import normalise, quoted_text

DEFAULT_SIZE = 5000
DEFAULT_SEED = 2026
MAX_PROMPTS_PER_TARGET = 2  # the same text in two scenes at most, so that thousands of targets are seen

# The word lists the phrases are made of; a phrase pattern names them in braces
WORDS: dict[str, tuple[str, ...]] = {
    "surname": ("Miller", "Baker", "Turner", "Parker", "Carter", "Walker", "Harper", "Fletcher", "Cooper", "Hughes",
                "Porter", "Morgan", "Bennett", "Foster", "Sullivan", "Reed", "Brooks", "Hayes", "Dawson", "Wells",
                "Fisher", "Lawson", "Palmer", "Grant", "Bailey", "Murphy", "Spencer", "Ellis", "Webb", "Hunt"),
    "shop": ("Bakery", "Books", "Coffee", "Diner", "Barbershop", "Florist", "Hardware", "Pizzeria", "Tailors", "Deli",
             "Records", "Bicycles", "Pharmacy", "Laundry", "Market", "Tavern", "Bistro", "Creamery", "Grocery",
             "Antiques", "Toys", "Cafe", "Butcher", "Candles", "Jewelers", "Noodle Bar", "Pet Shop", "Ice Cream"),
    "emblem_adjective": ("Golden", "Rusty", "Blue", "Little", "Happy", "Lucky", "Silver", "Old", "Red", "Green",
                         "Sleepy", "Crooked", "Velvet", "Copper", "Jolly", "Hungry", "Wandering", "Humble", "Brave",
                         "Cozy"),
    "emblem": ("Spoon", "Lantern", "Anchor", "Fox", "Owl", "Kettle", "Acorn", "Whale", "Teapot", "Compass", "Bell",
               "Moon", "Pine", "Rabbit", "Sparrow", "Barrel", "Bicycle", "Otter", "Lemon", "Feather"),
    "tree": ("Maple", "Oak", "Elm", "Cedar", "Birch", "Willow", "Chestnut", "Walnut", "Cherry", "Juniper"),
    "activity": ("Parking", "Swimming", "Fishing", "Smoking", "Skateboarding", "Littering", "Trespassing", "Camping",
                 "Diving", "Hunting", "Photography", "Loitering", "Jet Skiing", "Open Fires"),
    "allowed_only": ("Staff", "Employees", "Residents", "Members", "Bicycles", "Buses", "Deliveries",
                     "Authorized Personnel", "Emergency Vehicles", "Customers", "Pedestrians", "Guests"),
    "outdoor_hazard": ("Thin Ice", "Deep Water", "Uneven Ground", "Strong Currents", "Steep Cliffs", "Soft Sand",
                       "Rip Currents", "Slippery Rocks", "Loose Rocks", "Falling Branches"),
    "indoor_hazard": ("Wet Floor", "Hot Surface", "Slippery Steps", "Low Ceiling", "High Voltage", "Wet Paint",
                      "Moving Parts", "Watch Your Step", "Hearing Protection Required"),
    "beware": ("Dog", "Bears", "Snakes", "Geese", "Bees", "Alligators", "Falling Coconuts", "the Goat", "Rattlesnakes",
               "Attack Cat"),
    "hazard_ahead": ("Road Work", "Sharp Curve", "Steep Grade", "Falling Rocks", "Bridge Out", "Detour", "Low Bridge",
                     "Loose Gravel", "Deer Crossing", "Flooded Road", "Slow Traffic", "Toll Booth", "Lane Closed",
                     "Narrow Bridge"),
    "speed": ("15", "20", "25", "30", "35", "40", "45", "50", "55", "65"),
    "miles": ("2", "5", "8", "12", "17", "23", "31", "46"),
    "title_adjective": ("Silent", "Hidden", "Forgotten", "Broken", "Secret", "Distant", "Crimson", "Midnight", "Lost",
                        "Quiet", "Burning", "Hollow", "Iron", "Glass", "Paper", "Wild", "Golden", "Frozen", "Endless",
                        "Fading"),
    "title_noun": ("Garden", "River", "Kingdom", "Letter", "Lighthouse", "Orchard", "Harbor", "Mountain", "Island",
                   "Promise", "Machine", "Clock", "Forest", "Tide", "Road", "Station", "Crown", "Mirror", "Voyage",
                   "Summer"),
    "title_plural": ("Whispers", "Shadows", "Stars", "Ashes", "Echoes", "Kings", "Thieves", "Storms", "Secrets",
                     "Wolves", "Tides", "Lanterns", "Ghosts", "Bridges", "Roses"),
    "title_place": ("Winter", "Autumn", "Spring", "Paris", "Venice", "Tokyo", "Rome", "Vienna", "Lisbon",
                    "December"),
    "hobby": ("Surf", "Hike", "Bake", "Read", "Dance", "Run", "Garden", "Code", "Fish", "Climb", "Paint", "Skate",
              "Knit", "Camp", "Sing", "Ride", "Travel", "Golf", "Swim", "Ski"),
    "treat": ("Coffee", "Tacos", "Pizza", "Tea", "Donuts", "Pancakes", "Cookies", "Chocolate", "Bagels", "Noodles"),
    "loved": ("Coffee", "Tacos", "Pizza", "Cats", "Dogs", "Books", "Mountains", "Summer", "Jazz", "Camping", "Paris",
              "New York", "Rainy Days", "Road Trips", "Sushi", "Tuesdays"),
    "role": ("Dad", "Mom", "Teacher", "Nurse", "Grandpa", "Grandma", "Boss", "Coach", "Uncle", "Aunt", "Sister",
             "Brother", "Friend", "Neighbor"),
    "fruit": ("Strawberry", "Raspberry", "Apricot", "Peach", "Blueberry", "Cherry", "Fig", "Plum", "Blackberry",
              "Grape", "Rhubarb", "Gooseberry"),
    "preserve": ("Jam", "Jelly", "Preserves", "Compote"),
    "pantry_adjective": ("Organic", "Local", "Fresh", "Roasted", "Salted", "Smoked", "Pickled", "Spiced"),
    "pantry": ("Almonds", "Peanuts", "Garlic", "Peppers", "Walnuts", "Olives", "Beets", "Cashews", "Pecans",
               "Onions", "Chickpeas", "Pistachios"),
    "spice": ("Smoked Paprika", "Ground Cumin", "Sea Salt", "Black Pepper", "Dried Oregano", "Cinnamon", "Turmeric",
              "Garlic Powder", "Chili Flakes", "Bay Leaves", "Nutmeg", "Curry Powder"),
    "room": ("Kitchen", "Bedroom", "Garage", "Office", "Bathroom", "Nursery", "Attic", "Basement", "Living Room"),
    "box_contents": ("Plates", "Linens", "Tools", "Files", "Books", "Toys", "Towels", "Photos", "Cables", "Shoes",
                     "Decorations", "Glasses"),
    "fragile": ("Glass", "Dishes", "Glasses", "Mirror", "Lamp", "Vase", "Ceramics", "Electronics", "Artwork"),
    "produce": ("Apples", "Pears", "Peaches", "Tomatoes", "Carrots", "Potatoes", "Pumpkins", "Sweet Corn", "Cherries",
                "Plums", "Blueberries", "Squash"),
    "task": ("Upload", "Download", "Backup", "Update", "Installation", "Payment", "Checkout", "Sync", "Scan",
             "Transfer", "Export", "Recording"),
    "gate": ("A3", "A14", "B7", "B12", "C4", "C21", "D9", "D16", "E2", "E11", "F5", "G8"),
    "player": ("One", "Two", "1", "2"),
    "number": tuple(str(n) for n in (2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 14, 15, 17, 21, 23, 36, 42, 57, 88, 99)),
    "flight": tuple(str(n) for n in (118, 205, 316, 482, 527, 619, 734, 851, 903, 1127, 1450, 2208)),
    "first_name": ("Emma", "Olivia", "Liam", "Noah", "Ava", "Mia", "Lucas", "Grace", "Henry", "Chloe", "Jack", "Sophie",
                   "Oliver", "Lily", "Ethan", "Zoe", "Leo", "Ruby", "Max", "Nora", "Sam", "Ella", "Owen", "Hazel"),
    "device_message": ("Connection Lost", "No Signal", "System Ready", "Access Granted", "Access Denied",
                       "Please Wait", "Card Declined", "Restart Required", "Storage Almost Full", "Charging Complete",
                       "Battery Low", "Update Available"),
    "arcade_message": ("Game Over", "Press Start", "Insert Coin", "New High Score", "Stage Clear", "You Win",
                       "Try Again", "Continue"),
    "town": ("Riverside", "Lakeside", "Oakwood", "Maplewood", "Brookfield", "Fairview", "Springfield", "Greenwood",
             "Westfield", "Hillcrest", "Bayside", "Millbrook", "Clearwater", "Pinecrest"),
    "festival": ("Jazz", "Blues", "Folk", "Rock", "Bluegrass", "Film", "Kite", "Wine", "Lantern", "Harvest", "Balloon",
                 "Music", "Food", "Art", "Poetry", "Dance"),
    "season": ("Spring", "Summer", "Autumn", "Winter", "Holiday"),
    "seasonal_event": ("Book Fair", "Craft Market", "Farmers Market", "Bake Sale", "Art Walk", "Flea Market",
                       "Garden Show", "Food Drive", "Clearance Sale", "Block Party", "Car Wash", "Fun Run"),
    "live": ("Jazz", "Blues", "Music", "Comedy", "Folk", "Rock", "Karaoke", "Piano", "Bluegrass"),
    "cook_off": ("Chili", "Barbecue", "Pie", "Pancake", "Cupcake", "Burger", "Salsa", "Gumbo"),
    "weekday": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "year": tuple(str(year) for year in range(2019, 2032)),
    "ordinal": ("5th", "10th", "16th", "18th", "21st", "25th", "30th", "40th", "50th", "60th", "65th", "70th", "75th",
                "80th", "90th", "100th"),
    "occasion": ("Anniversary", "Retirement", "Graduation", "Holidays", "New Year", "Mother's Day", "Father's Day",
                 "Valentine's Day", "Housewarming", "Halloween"),
    "dishes": ("Tacos", "Bagels", "Pancakes", "Waffles", "Burgers", "Donuts", "Pretzels", "Croissants", "Muffins",
               "Smoothies", "Dumplings", "Crepes", "Scones", "Cookies", "Sandwiches", "Cinnamon Rolls"),
    "dish": ("Soup", "Pie", "Cake", "Quiche", "Salad", "Sandwich", "Smoothie", "Catch", "Burger", "Pasta", "Curry",
             "Cupcake"),
    "drink": ("Coffee", "Soda", "Tea", "Lemonade", "Iced Tea"),
}

# The phrases each kind of text is drawn from: patterns over WORDS, 1 to 4 words once filled in
PHRASES: dict[str, tuple[str, ...]] = {
    "shop_name": ("{surname}'s {shop}", "The {emblem_adjective} {emblem}", "{emblem_adjective} {emblem} {shop}",
                  "{tree} Street {shop}", "{surname} and Sons", "{surname} {shop}"),
    "cafe_name": ("{surname}'s Coffee", "{emblem_adjective} {emblem} Coffee", "The {emblem_adjective} {emblem} Cafe",
                  "{tree} Street Coffee", "{tree} Street Roasters"),
    "prohibition": ("No {activity}", "{activity} Prohibited", "{allowed_only} Only"),
    "outdoor_warning": ("Caution {outdoor_hazard}", "Danger {outdoor_hazard}", "Beware of {beware}", "No {activity}"),
    "indoor_warning": ("Caution {indoor_hazard}", "Danger {indoor_hazard}", "{allowed_only} Only"),
    "road": ("{hazard_ahead} Ahead", "Speed Limit {speed}", "Welcome to {town}", "{town} {miles} Miles",
             "{town} Next Exit"),
    "title": ("The {title_adjective} {title_noun}", "{title_noun} of {title_plural}", "The Last {title_noun}",
              "A {title_noun} in {title_place}", "{title_adjective} {title_plural}", "The {title_noun} Keeper"),
    "slogan": ("I Love {loved}", "Born to {hobby}", "Powered by {treat}", "Will {hobby} for {treat}",
               "Eat Sleep {hobby} Repeat", "World's Best {role}", "Keep Calm and {hobby}", "{hobby} More Worry Less"),
    "jar_label": ("Homemade {fruit} {preserve}", "{fruit} {preserve}", "{pantry_adjective} {pantry}", "{spice}"),
    "box_label": ("{room} {box_contents}", "Fragile {fragile}", "{room} Box {number}"),
    "produce_label": ("Fresh {produce}", "Local {produce}", "Organic {produce}", "{pantry_adjective} {pantry}"),
    "device_message": ("{task} Complete", "{task} Failed", "Welcome Back {first_name}", "New Message from {first_name}",
                       "{device_message}"),
    "arcade": ("Level {number} Complete", "Player {player} Wins", "World {number} Complete", "{arcade_message}"),
    "departures": ("Gate {gate} Now Boarding", "Flight {flight} On Time", "Flight {flight} Delayed",
                   "Flight {flight} Cancelled", "Final Call Gate {gate}"),
    "event": ("{town} {festival} Festival", "{town} {festival} Festival {year}", "{season} {seasonal_event}",
              "Live {live} Tonight", "Annual {cook_off} Cook Off", "{weekday} Trivia Night", "{town} {year}"),
    "greeting": ("Happy Birthday {first_name}", "Happy {ordinal} Birthday", "Congratulations {first_name}",
                 "Welcome Home {first_name}", "Happy {occasion}", "Thank You {role}", "Get Well Soon {first_name}",
                 "Happy {ordinal} {first_name}"),
    "menu": ("Fresh {dishes} Daily", "Try Our New {dish}", "Half Price {dishes}", "{dish} of the Day",
             "Free {drink} Refills", "{weekday} {dish} Special", "Homemade {dishes}"),
}


class Scene(NamedTuple):
    """A place where a text is written."""

    kinds: tuple[str, ...]  # the kinds of text (PHRASES) the place plausibly shows
    template: str  # a sentence with "{text}" in double quotes, ending with "{light}" (outdoors) or "{indoor_light}"


SCENES = (
    Scene(("shop_name",), 'A realistic photograph of a small shop front with a hand-painted wooden sign reading '
                          '"{text}" above the door, flower pots on the sidewalk, {light}.'),
    Scene(("shop_name",), 'A striped canvas awning over a corner store, printed with the words "{text}" in bold '
                          'white letters, pedestrians passing by on a busy street, {light}.'),
    Scene(("shop_name",), 'A glowing neon sign in a shop window spelling "{text}" in pink and blue tubes, its '
                          'reflection shimmering on the pavement, {light}.'),
    Scene(("shop_name",), 'A white delivery van parked on a cobblestone street, its side panel painted with "{text}" '
                          'in a friendly rounded font, {light}.'),
    Scene(("shop_name",), 'A close-up of a shop window with gold-leaf lettering that reads "{text}", a display of '
                          'goods behind the glass, {light}.'),
    Scene(("cafe_name",), 'A paper coffee cup on a wooden counter, its sleeve stamped with the logo "{text}", steam '
                          'curling from the lid, {indoor_light}.'),
    Scene(("prohibition",), 'A realistic photograph of a metal sign on a chain-link fence that reads "{text}" in red '
                            'capital letters, an empty lot behind it, {light}.'),
    Scene(("road",), 'A yellow road sign by a winding mountain road clearly displaying "{text}", pine trees and a '
                     'guardrail beside it, {light}.'),
    Scene(("road",), 'A green highway sign mounted above a wide freeway, its white letters reading "{text}", traffic '
                     'flowing beneath it, {light}.'),
    Scene(("outdoor_warning",), 'A weathered wooden sign staked into the sand at the edge of a beach, painted with '
                                'the words "{text}", waves rolling in behind it, {light}.'),
    Scene(("outdoor_warning", "prohibition"), 'A sturdy park sign mounted on two wooden posts at a trailhead, carved '
                                              'with "{text}", a gravel path leading into the forest, {light}.'),
    Scene(("indoor_warning", "prohibition"), 'An official notice taped to a glass door in an office building, '
                                             'printed in large black type with "{text}", a hallway visible through '
                                             'the glass, {indoor_light}.'),
    Scene(("indoor_warning",), 'A bright safety sign screwed to the wall of a factory workshop that reads "{text}", '
                               'machines and workbenches around it, {indoor_light}.'),
    Scene(("title",), 'A hardcover novel lying on a wooden desk, its cover showing the title "{text}" in elegant '
                      'serif letters above a painted landscape, {indoor_light}.'),
    Scene(("title",), 'A dramatic movie poster on a cinema wall with the title "{text}" in large metallic letters '
                      'over a moody scene, {indoor_light}.'),
    Scene(("title",), 'A vinyl record sleeve propped on a shelf, the album title "{text}" printed in retro lettering '
                      'across a colorful abstract design, {indoor_light}.'),
    Scene(("title",), 'A stack of paperback books in a secondhand bookshop, the top one titled "{text}" on a faded '
                      'cover, dust floating in the air, {indoor_light}.'),
    Scene(("title",), 'A theater marquee above the entrance of an old playhouse, its lights framing the show title '
                      '"{text}", a small crowd gathering below, {light}.'),
    Scene(("slogan",), 'A person wearing a plain cotton t-shirt printed with "{text}" in bold letters across the '
                       'chest, standing in a city park, {light}.'),
    Scene(("slogan",), 'A ceramic coffee mug on a kitchen table with the words "{text}" printed on its side, a plate '
                       'of breakfast beside it, {indoor_light}.'),
    Scene(("slogan",), 'A canvas tote bag hanging from a hook, screen-printed with "{text}" in playful hand-drawn '
                       'letters, {indoor_light}.'),
    Scene(("slogan",), 'A bumper sticker on the back of a dusty hatchback that reads "{text}", parked at a roadside '
                       'diner, {light}.'),
    Scene(("slogan",), 'A baseball cap resting on a bench, its front embroidered with "{text}" in thick thread, '
                       '{light}.'),
    Scene(("jar_label",), 'A glass jar on a rustic kitchen shelf with a handwritten paper label reading "{text}", '
                          'tied with twine, {indoor_light}.'),
    Scene(("box_label",), 'A cardboard moving box in an empty room, marked "{text}" in thick black marker on its '
                          'side, {indoor_light}.'),
    Scene(("produce_label",), 'A farmers market stall with a wooden crate labeled "{text}" on a chalk tag, shoppers '
                              'browsing the produce, {light}.'),
    Scene(("shop_name", "produce_label"), 'A close-up of a printed sticker on a brown paper bag that says "{text}", '
                                          'resting on a checkout counter, {indoor_light}.'),
    Scene(("device_message",), 'A smartphone lying on a desk, its screen showing a notification that reads "{text}" '
                               'in a clean sans-serif font, {indoor_light}.'),
    Scene(("device_message",), 'A laptop on a cafe table, a dialog box on its screen reading "{text}", a cup of '
                               'coffee beside it, {indoor_light}.'),
    Scene(("device_message",), 'A smartwatch on a wrist, its small display flashing "{text}", a blurred city street '
                               'in the background, {light}.'),
    Scene(("arcade",), 'An old arcade cabinet in a dim game room, the screen glowing with the pixelated message '
                       '"{text}", {indoor_light}.'),
    Scene(("departures",), 'A large departure board in a busy airport terminal displaying "{text}" in bright amber '
                           'letters, travelers with suitcases below, {indoor_light}.'),
    Scene(("event",), 'A colorful poster stapled to a wooden telephone pole announcing "{text}" in big bold letters, '
                      'with smaller details printed below, {light}.'),
    Scene(("event", "greeting"), 'A large vinyl banner stretched between two lampposts over a main street, printed '
                                 'with "{text}", bunting fluttering nearby, {light}.'),
    Scene(("event",), 'A sidewalk chalkboard outside a community hall with "{text}" written in colorful chalk, '
                      '{light}.'),
    Scene(("event",), 'A printed flyer pinned to a cork bulletin board among other notices, its headline reading '
                      '"{text}", {indoor_light}.'),
    Scene(("event", "road"), 'A digital billboard beside a highway showing the words "{text}" against a bright '
                             'gradient, cars passing below, {light}.'),
    Scene(("greeting",), 'A beautifully decorated birthday cake with smooth frosting, the words "{text}" piped on '
                         'top in icing, surrounded by lit candles, {indoor_light}.'),
    Scene(("greeting",), 'A handmade greeting card standing on a mantelpiece, its front reading "{text}" in looping '
                         'calligraphy, {indoor_light}.'),
    Scene(("greeting",), 'A string of foil balloon letters spelling "{text}" hanging across a living room wall, '
                         'streamers and confetti below, {indoor_light}.'),
    Scene(("greeting",), 'A paper banner over a front door with "{text}" painted in cheerful letters, a welcome mat '
                         'beneath it, {light}.'),
    Scene(("greeting",), 'A decorated sugar cookie on a baking tray with "{text}" written in colored icing, '
                         '{indoor_light}.'),
    Scene(("menu",), 'A cozy cafe with a chalkboard menu behind the counter announcing "{text}" in neat handwriting, '
                     'pastries in a glass case, {indoor_light}.'),
    Scene(("menu",), 'A brightly painted food truck parked at a festival, a sign on its side advertising "{text}", a '
                     'short line of customers waiting, {light}.'),
    Scene(("menu",), 'A window decal on a small diner reading "{text}" in retro red letters, booths visible inside, '
                     '{light}.'),
    Scene(("menu",), 'An A-frame sidewalk sign outside a bakery with "{text}" chalked on it, a bicycle leaning '
                     'against the wall, {light}.'),
)

# When and how each scene is lit (the scene sentences end with one): outdoor scenes take `{light}`, indoor ones
# `{indoor_light}`
LIGHTS = ("in soft morning light", "at dusk", "under a clear blue sky", "at night under streetlights",
          "on a rainy afternoon", "in warm golden-hour light", "on an overcast day", "in bright midday sun")
INDOOR_LIGHTS = ("under warm indoor lighting", "in soft window light", "under cool fluorescent light",
                 "in the glow of a desk lamp", "in soft natural light", "under bright studio lighting",
                 "in dim evening light", "in warm lamplight")

SLOT = re.compile(r"\{(\w+)\}")


def fill(pattern: str, words: Mapping[str, Sequence[str]], rng: random.Random) -> str:
    """`pattern` with each `{slot}` replaced by a word drawn from `words[slot]`."""
    return SLOT.sub(lambda slot: rng.choice(words[slot.group(1)]), pattern)


def phrase(kind: str, rng: random.Random) -> str:
    """A short text of `kind` ("shop_name", "road", ...): a pattern of PHRASES[kind] filled from WORDS."""
    return fill(rng.choice(PHRASES[kind]), WORDS, rng)


def scene_prompt(template: str, text: str, rng: random.Random) -> str:
    """A scene's sentence with `text` as its quoted target and a light drawn for an outdoor or an indoor scene."""
    light = rng.choice(INDOOR_LIGHTS if "{indoor_light}" in template else LIGHTS)
    return template.replace("{text}", text).replace("{light}", light).replace("{indoor_light}", light)


def target_key(prompt: str) -> str:
    """A prompt's target as the OCR reward compares it: the quoted text, lower case, without spaces."""
    return normalise(quoted_text(prompt))


def training_prompts(test_prompts: Iterable[str], size: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED) -> list[str]:
    """`size` distinct prompts, none of them a test prompt nor with a test prompt's target, each target at most
    MAX_PROMPTS_PER_TARGET times."""
    test_prompts = set(test_prompts)
    test_targets = {target_key(prompt) for prompt in test_prompts}
    rng = random.Random(seed)
    prompts: list[str] = []
    seen: set[str] = set()
    uses: Counter[str] = Counter()
    for _ in range(100 * size):  # far more draws than needed; the loop ends at `size` prompts
        if len(prompts) == size:
            break
        kinds, template = rng.choice(SCENES)
        prompt = scene_prompt(template, phrase(rng.choice(kinds), rng), rng)
        key = target_key(prompt)
        if prompt in seen or prompt in test_prompts or key in test_targets or uses[key] >= MAX_PROMPTS_PER_TARGET:
            continue
        prompts.append(prompt)
        seen.add(prompt)
        uses[key] += 1
    if len(prompts) < size:
        raise ValueError(f"only {len(prompts)} distinct OCR training prompts could be drawn, {size} were asked for")
    return prompts


def read_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def lines_text(prompts: Iterable[str]) -> str:
    """One prompt per line."""
    return "".join(prompt + "\n" for prompt in prompts)

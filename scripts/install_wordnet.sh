#!/usr/bin/env bash
# Puts WordNet 3.0 where nltk looks for it (METEOR's synonym stage), without any download from
# nltk's servers: Debian's wordnet-base + wordnet-sense-index provide the database files; nltk also
# wants a `lexnames` file that Debian does not ship, written here from lexnames(5).
# Usage: scripts/install_wordnet.sh NLTK_DATA_DIR
set -euo pipefail
dest="${1:?usage: install_wordnet.sh NLTK_DATA_DIR}/corpora/wordnet"
src=/usr/share/wordnet
if [ ! -f "$src/data.noun" ] || [ ! -f "$src/index.sense" ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null
  fi
fi
[ -f "$src/data.noun" ] || src=$(dirname "$(dpkg -L wordnet-base | grep '/data.noun$' | head -n1)")
mkdir -p "$dest"
# nltk refuses paths that lead outside its data directory, so copy rather than link.
for f in "$src"/*; do
  case "$(basename "$f")" in
    data.*|index.*|*.exc|lexnames|cntlist*|verb.*|sents.vrb|adj.exc|adv.exc) cp -f "$f" "$dest/" ;;
  esac
done
if [ ! -f "$dest/lexnames" ]; then
  names=(adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute
    noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group
    noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession
    noun.process noun.quantity noun.relation noun.shape noun.state noun.substance noun.time
    verb.body verb.change verb.cognition verb.communication verb.competition verb.consumption
    verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession
    verb.social verb.stative verb.weather adj.ppl)
  : > "$dest/lexnames"
  for i in "${!names[@]}"; do
    n=${names[$i]}
    case "$n" in adj.*) pos=3 ;; adv.*) pos=4 ;; noun.*) pos=1 ;; verb.*) pos=2 ;; esac
    printf '%02d\t%s\t%s\n' "$i" "$n" "$pos" >> "$dest/lexnames"
  done
fi
echo "WordNet 3.0 in $dest ($(ls "$dest" | wc -l) files)"

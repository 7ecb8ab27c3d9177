"""Tiny random models built locally from configs, so tests never touch a model hub.

`build_tiny_store(root)` writes a model store with `tiny-student` (BertModel, mean pooling,
"query: "/"passage: " prefixes), `tiny-teacher` (BertForSequenceClassification, 1 logit) and
`tiny-generator` (LlamaForCausalLM with a ChatML chat template). Weights are seeded, so every build
gives the same models. The WordPiece vocabulary is real lowercase English (the most frequent
words of BERT's uncased vocabulary) plus science words, single characters and common suffixes, so
real text tokenizes into words rather than [UNK].
"""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertTokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from ml_core.registry import ModelSpec, folder_sha256

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GENERATOR_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

WORDS = """
the of and in to was he is as for on with that it his by at from her she you had an were but be
this are not my they one which or have him me first all also their has up who out been when
after there into new two its time would no what about said we over then other so more can if
like back them only some could where just during before do made school through than now years
most world may between down well three year while will later city under around did such being
used state people part know against your many second university both national these don known
off way until re how even get head didn team american because de born united film since still
long work south us became any high again day family see right man eyes house season war states
including took life north same each called name much place however go four group another found
won area here going away series left home music best make hand number company several never last
john very album take end good too following released game played little began district old want
those side held own early county ll league use west face think government march came small
general town june line based something september thought looked along international air july
club went january october our august april york few east show member college father public come
men five set station church next former november room party located december age got system let
love though every look song water century without body black night within great women single ve
building large population river named band white started once should service top built british
open death king moved local times children february book why door need president order final
road wasn although due major died village third knew asked turned st wanted say together
received main son served different behind himself felt members power football law voice play
near park history having saw mother army point front help english street art late hands games
award young put published country division across told often ever french london center six red
led days include light find tell among species really according central half form original gave
office making enough lost full opened must included live given german player run business woman
community cup might million land court development short round ii km seen class story always
become sure research almost director council la career things using island couldn car close
force better free support control field students education married nothing worked others record
big inside level anything continued give james military established non returned feel does title
written thing feet william far co association hard already championship human western department
hall role various production heart living fire version television royal produced working act
case society region present radio period looking least total keep england wife program per
brother mind special am works soon political george services taken created further able reached
david union joined upon done important social information either appeared position ground lead
rock dark election board france hair course arms site police girl instead real sound words
moment someone summer project announced san less wrote past followed blue founded al finally
india taking records america design considered northern god stop battle toward european outside
described track today playing language call heard professional low australia miles california
win yet green trying blood southern science maybe everything match square mouth video race
recorded leave above daughter points space museum change middle common move tv post lake seven
tried elected closed ten paul minister months start chief return canada person sea release
similar modern brought rest hit formed mr floor event doing thomas robert care killed training
star week needed turn finished railway rather news health sent example ran term michael coming
currently yes forces despite gold areas stage fact dead says popular originally germany probably
developed result pulled friend stood money running mi signed word songs child eventually met
tour average teams minutes festival current deep kind decided usually eastern seemed episode bed
added table indian private charles route available idea throughout centre addition appointed
style books eight construction press mean wall friends remained schools study institute oh
chinese sometimes events possible australian type brown forward talk process food debut seat
performance committee features character arts herself else lot strong russian range hours peter
arm morning dr sold quickly directed guitar china list performed media uk players smile myself
placed coach province towards wouldn leading whole boy official designed grand census europe
attack japanese henry cross getting alone action lower network wide washington japan hospital
believe changed sister hold gone sir hadn ship studies academy shot rights below base bad
involved kept largest bank future especially beginning mark movement section female magazine
plan professor lord longer sat walked hill actually civil energy model families size thus
aircraft completed includes data captain fight vocals featured richard bridge fourth officer
stone hear means medical groups management self lips competition entire lived technology leaving
federal tournament bit passed hot independent awards kingdom mary spent fine doesn reported jack
fall raised itself stay true studio sports replaced paris systems saint leader theatre whose
market capital parents spanish canadian earth cut degree writing bay christian awarded natural
higher bill coast provided previous senior ft valley organization stopped onto countries parts
conference queen security interest saying allowed master earlier phone matter smith winning try
happened moving campaign los breath nearly mid certain girls date italian african standing fell
artist shows deal mine industry everyone republic provide collection library student primary
owned older via heavy makes attention anyone africa stated length ended fingers command staff
skin foreign opening governor okay medal kill sun cover job introduced chest hell feeling
success meet reason standard meeting novel trade source buildings rose guy goal chapter native
husband previously unit limited entered weeks producer operations mountain takes covered forced
related roman complete successful key texas cold channel traditional films dance clear
approximately nine van prince question active tracks ireland regional silver author personal
sense operation economic holding twenty isbn additional speed hour edition regular historic
places whom shook movie secretary prior report chicago read foundation view engine scored units
ask airport property ready immediately lady month listed contract manager themselves lines navy
writer meant runs practice championships singer glass commission required forest starting
culture generally giving access attended test couple stand catholic martin caught executive eye
thinking chair quite shoulder hope decision plays defeated municipality whether structure
offered slowly pain ice direction paper mission mostly noted individual managed nature lives
plant helped except studied computer figure relationship issue significant loss die smiled gun
ago highest male bring goals mexico problem distance commercial completely location annual
famous drive neck surface caused italy understand greek highway wrong hotel comes appearance
joseph double issues musical companies castle income review assembly bass initially parliament
artists experience particular walk foot engineering talking window dropped miss baby boys break
stars edge remember policy carried train stadium bar sex angeles evidence becoming assistant
soviet upper step wing youth financial reach actor numerous nodded arrived minute believed sorry
complex beautiful victory associated temple chance perhaps metal bishop lee launched
particularly tree le retired subject prize contains yeah theory empire suddenly waiting trust
recording happy terms camp champion religious pass zealand names port ancient tom corner
represented watch legal anti justice cause watched brothers material changes simply response
louis fast answer historical stories straight create feature increased rate administration
virginia el activities cultural overall winner programs basketball legs guard beyond cast doctor
mm flight results remains cost effect winter larger islands problems chairman grew commander isn
pay failed selected hurt fort box regiment majority journal edward plans shown pretty irish
characters directly scene likely operated allow spring junior matches looks mike houses fellow
beach marriage rules oil florida expected nearby congress sam peace recent iii wait subsequently
cell variety serving agreed please poor joe pacific attempt wood democratic piece prime rural
mile touch appears township soldiers pennsylvania closer fighting claimed score jones physical
editor filled genus specific sitting super mom therefore supported status fear cases store
meaning wales minor spain tower focus vice frank follow parish separate golden horse fifth
remaining branch presented stared uses secret forms baseball exactly choice note discovered
travel composed truth russia ball color kiss dad wind continue ring referred numbers digital
greater metres slightly direct increase responsible crew rule trees troops broke goes
individuals hundred weight creek sleep memory defense provides ordered code value jewish windows
safe judge whatever corps realized growing pre cities alexander gaze lies spread scott letter
showed situation mayor transport watching workers extended expression normal chart multiple
border host daily mrs walls piano heat cannot earned products drama era authority seasons join
grade sign difficult machine territory mainly stations squadron stepped iron serve appear sky
speak broken charge knowledge kilometres removed ships article campus simple pushed britain
leaves recently cd soft boston latter easy acquired poland quality officers presence planned
nations mass broadcast jean share image influence wild offer emperor electric reading headed
ability promoted yellow ministry throat smaller politician latin spoke cars williams males lack
pop acting seeing consists estate pressure johnson newspaper jr chris olympics online conditions
beat elements walking vote needs carolina text featuring global block shirt levels francisco
purpose females et dutch duke ahead gas twice safety serious turning highly lieutenant firm
maria amount mixed daniel proposed perfect agreement affairs seconds contemporary paid prison
save kitchen label administrative intended constructed academic nice teacher races formerly
corporation ben nation issued shut drums housing victoria seems opera graduated function von
mentioned picked build recognized shortly protection picture notable exchange elections loved
percent racing fish elizabeth garden volume hockey beside settled competed replied drew actress
marine scotland steel glanced farm steve risk tonight positive magic singles effects gray screen
dog residents bus sides none secondary literature polish destroyed flying founder households lay
reserve usa gallery industrial younger approach appearances urban ones finish avenue powerful
fully growth page honor jersey projects advanced revealed basic infantry pair equipment visit
evening search grant effort solo treatment buried republican primarily bottom owner israel gives
jim dream bob remain spot notes produce champions contact ed soul accepted ways del losing split
price capacity basis trial questions guess officially memorial naval initial whispered median
engineer sydney columbia strength tears senate card asian agent software draw warm supposed com
pro transferred leaned candidate escape mountains asia potential activity entertainment seem
traffic jackson murder slow product orchestra haven agency bbc taught website comedy unable
storm planning albums rugby environment scientific grabbed protect boat typically damage
principal divided dedicated mount ohio pick fought driver empty shoulders sort thank berlin
prominent account freedom necessary efforts alex headquarters follows alongside des simon andrew
suggested operating learning steps sweet technical begin easily teeth speaking settlement scale
renamed ray max enemy semi joint compared scottish leadership analysis offers georgia pieces
captured animal deputy guest organized tony combined method challenge huge wants battalion sons
rise crime types facilities telling path platform sit tells assigned rich pull commonly alive
letters concept conducted wearing happen bought becomes holy gets ocean defeat languages
purchased coffee occurred titled declared applied sciences concert sounds jazz brain painting
fleet tax nick michigan count animals leaders episodes content birth clubs palace critical
refused fair leg laughed returning surrounding participated formation lifted pointed connected
rome medicine laid taylor santa powers adam tall shared focused knowing yards entrance falls
calling sources chosen beneath resources yard nominated silence zone defined gained thirty
bodies moon adopted christmas widely register apart iran premier serves du unknown parties
generation continues quick fields brigade quiet teaching clothes impact weapons partner flat
theater supreme relations plants suffered wilson kids begins seats armed internet models worth
laws communities classes background knows thanks quarter reaching humans carry killing format
kong hong setting architecture disease railroad inc possibly wish arthur thoughts harry doors
density crowd illinois stomach tone unique reports anyway liberal der vehicle thick dry drug
faced largely facility theme holds creation strange colonel revolution bell politics turns
silent rail relief independence combat shape write determined sales learned finger oxford
providing heritage fiction situated designated allowing distribution hosted sight interview
estimated reduced toronto footballer keeping guys damn claim motion sport sixth stayed en rear
receive handed twelve dress audience granted brazil spirit noticed etc olympic representative
eric tight trouble reviews drink vampire missing roles ranked newly household finals wave
critics phase massachusetts pilot unlike philadelphia bright guns crown organizations roof
respectively clearly tongue marked circle fox korea bronze brian expanded sexual supply yourself
inspired labour fc reference vision draft connection brand reasons classic driving trip jesus
cells entry neither trail claims atlantic orders labor nose afraid identified intelligence calls
cancer attacked passing stephen positions imperial grey jason sunday swedish avoid extra uncle
message covers allows surprise materials fame hunter citizens figures davis environmental
confirmed shit titles di performing difference acts attacks existing votes opportunity nor shop
entirely trains opposite pakistan develop resulted representatives actions reality pressed
barely wine conversation faculty northwest ends documentary nuclear stock grace sets eat
alternative bag resulting creating surprised cemetery drop finding sarah cricket streets
tradition ride exhibition target ear explained rain composer injury apartment municipal
educational occupied netherlands clean billion constitution learn maximum classical francis lose
opposition jose ontario bear core hills rolled ending drawn permanent fun lewis sites chamber
ryan scoring height lyrics staring officials snow oldest orange qualified interior apparently
succeeded thousand dinner lights existence fans heavily greatest conservative send bowl plus
enter catch economy duty speech authorities princess performances versions shall graduate
pictures effective remembered poetry desk crossed starring starts passenger sharp acres ass
weather falling rank fund supporting check adult publishing heads cm southeast lane application
bc les condition transfer prevent display ex regions earl federation cool relatively answered
besides obtained portion mix reaction liked dean express peak counter religion chain rare miller
convention aid lie vehicles mobile perform squad wonder lying crazy sword attempted centuries
weren philosophy category anna interested sweden wolf frequently abandoned kg literary alliance
task entitled threw promotion factory tiny soccer visited matt fm achieved defence internal
persian methods arrested otherwise cambridge programming villages elementary districts rooms
criminal conflict worry trained attempts waited signal bird truck subsequent programme ad
communist details faith sector patrick carrying laugh controlled korean showing origin fuel evil
brief identity darkness address pool missed publication web planet ian
"""

SCIENCE_WORDS = """
protein proteins gene genes dna rna tumor tumors virus viral patient patients clinical diseases
therapy drugs molecular receptor receptors enzyme enzymes bacteria bacterial infection
infections immune antibody antibodies neuron neurons mutation mutations tissue tissues insulin
vaccine mice mouse lung liver kidney bone muscle acid acids amino peptide lipid glucose
metabolism metabolic oxygen carbon nitrogen hydrogen chemical chemistry physics biology
biological molecule molecules atom atoms electron electrons velocity temperature flow fluid
wings airfoil boundary layer shock waves turbulent laminar reynolds mach supersonic subsonic
hypersonic equation equations solution solutions theoretical experiment experimental experiments
measured measurement measurements sample samples decrease decreased rates treatments trials dose
signaling pathway pathways inhibitor inhibition activation binding membrane nucleus chromosome
genome genetic genomic sequence sequencing transcription stem mitochondria mitochondrial
controls significantly retrieval query queries document documents passage passages index ranking
relevance neural networks embedding embeddings vector vectors scores
"""

SUFFIXES = """
##ing ##ed ##er ##ly ##es ##on ##us ##an ##en ##in ##man ##al ##ia ##is ##ra ##na ##ers ##le
##ic ##te ##ne ##ie ##ton ##ta ##th ##la ##ness ##ch ##um ##da ##ry ##ma ##rs ##el ##re ##os
##ar ##ka ##ist ##ian ##or ##ism ##ling ##ity ##as ##ley ##ted ##ng ##ville ##able ##ri ##ies
##land ##ur ##ya ##ine ##de ##ki ##ts ##ro ##less ##ey ##ion ##ha ##am ##ter ##ge ##ll ##se ##st
##ation ##nt ##son ##et ##ce ##to ##ting ##ble ##ke ##ni ##tion ##ham ##ive ##do ##ca ##men
##ized ##ous ##va ##id ##co ##ck ##ns ##no ##ga ##li ##ment ##ba ##ner ##ko ##ate ##io ##wood
##led ##ty ##ve ##sa ##by ##ier ##ti ##field ##ford ##ja ##ler ##ally ##ina ##ization ##ful ##go
##il ##at ##hi ##berg ##der ##sh ##rd ##lin ##lo ##ot ##za ##me ##ius ##line ##den ##it ##wa
##ad ##ite ##que ##ard ##les ##ff ##tor ##age ##di ##ir ##mi ##est ##ria ##ze ##well ##ated ##ee
##ah ##ji ##ov ##pa ##ish ##ps ##tes ##lla ##way ##house ##tic ##ger ##un ##ant ##burg ##ura
##town ##ding ##tte ##ping ##ize ##ay ##ging ##ol ##ss ##ent ##tt ##be ##ky ##ak ##ial ##han
##per ##nd ##ls ##ai ##au ##ny ##ring ##ut ##bury ##kin ##ron ##head ##ow ##ium ##mer ##pe ##sen
##ong ##ised ##bo ##ds ##ists ##ries ##dy ##ana ##worth ##ide ##ea ##ms ##nes ##don ##ku ##gan
##mo ##pur ##ul ##si ##rt ##ell ##om ##he ##ure ##ara ##che ##ney ##zed ##chi ##ik ##ker ##ski
##ini ##ran ##tone ##ica ##jo ##ise ##ung ##ning ##red ##ux ##gh ##hip ##gs ##dale ##bi ##one
##ons ##ary ##ang ##ue ##cy ##ors ##ped ##ber ##and ##ore ##ks ##im ##ded ##vi ##ino ##tz ##tan
##lan ##mann ##tus ##zi ##out ##ating ##gi ##gate ##sky ##water ##her ##nce ##bs ##ek ##tta
##back ##more ##ged ##tive ##izing ##ola ##yn ##res ##idae ##cing ##ens ##ii ##des ##cs ##shi
##sis ##work
"""


def tiny_vocab() -> list[str]:
    """The WordPiece vocabulary: specials, characters, words, then ## continuation pieces."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    continuation = [f"##{c}" for c in string.ascii_lowercase + string.digits]
    words = WORDS.split() + SCIENCE_WORDS.split()
    vocab = SPECIAL_TOKENS + chars + continuation + words + SUFFIXES.split()
    return list(dict.fromkeys(vocab))


def _bert_config(vocab_size: int, **extra: object) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **extra,
    )


def _save_bert_tokenizer(folder: Path, max_length: int) -> BertTokenizerFast:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(
        vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True,
        model_max_length=max_length,
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def _save_spec(folder: Path, spec: ModelSpec) -> ModelSpec:
    spec = spec.model_copy(update={"sha256": folder_sha256(folder)})
    return spec.write(folder)


def build_tiny_student(folder: Path) -> ModelSpec:
    """A 2-layer, 32-d BertModel student with mean pooling and E5-style prefixes."""
    tokenizer = _save_bert_tokenizer(folder, max_length=512)
    torch.manual_seed(0)
    BertModel(_bert_config(len(tokenizer)), add_pooling_layer=False).eval().save_pretrained(folder)
    return _save_spec(folder, ModelSpec(
        name="tiny-student", role="student", format="hf", path=".", pooling="mean",
        normalize=True, query_prefix="query: ", passage_prefix="passage: ",
        max_query_length=64, max_passage_length=128, dim=32, licence="test-only",
        source="tests/tiny_models.py (random weights, seed 0)",
    ))


def build_tiny_teacher(folder: Path) -> ModelSpec:
    """A 2-layer BertForSequenceClassification cross-encoder with one logit."""
    tokenizer = _save_bert_tokenizer(folder, max_length=512)
    torch.manual_seed(1)
    config = _bert_config(len(tokenizer), num_labels=1)
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    return _save_spec(folder, ModelSpec(
        name="tiny-teacher", role="teacher", format="hf", path=".",
        max_query_length=64, max_passage_length=512, licence="test-only",
        source="tests/tiny_models.py (random weights, seed 1)",
    ))


def _generator_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the tiny word list, with ChatML specials."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=GENERATOR_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = (WORDS + SCIENCE_WORDS).split()
    bpe.train_from_iterator([" ".join(text[i:i + 20]) for i in range(0, len(text), 20)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=512,
    )


def build_tiny_generator(folder: Path) -> ModelSpec:
    """A 2-layer LlamaForCausalLM with a ChatML chat template; eos is <|im_end|>."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _generator_tokenizer()
    tokenizer.save_pretrained(folder)
    torch.manual_seed(2)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    return _save_spec(folder, ModelSpec(
        name="tiny-generator", role="generator", format="hf", path=".",
        max_query_length=64, max_passage_length=512, licence="test-only",
        source="tests/tiny_models.py (random weights, seed 2)",
    ))


def build_tiny_store(root: Path) -> Path:
    """Build the three tiny models under `root/<name>/`; returns `root` (the store folder)."""
    root = Path(root)
    build_tiny_student(root / "tiny-student")
    build_tiny_teacher(root / "tiny-teacher")
    build_tiny_generator(root / "tiny-generator")
    return root


# Recipe sections that make a whole job take seconds on the tiny models (used by the pipeline
# tests directly and by the service tests as a job's `hyperparameters`).
TINY_HYPERPARAMETERS: dict = {
    "generation": {"max_new_tokens": 8, "batch_size": 16},
    # The tiny teacher is random: a round trip would keep chance survivors only.
    "candidates": {"top_k": 8, "round_trip": False, "min_score_percentile": 0.0},
    "training": {
        "list_size": 4,
        "batch_size": 8,
        "micro_batch_size": 4,
        "max_epochs": 2,
        "max_passage_length": 64,
        "max_query_length": 32,
    },
    "evaluation": {"test_fraction": 0.2},
}


# --------------------------------------------------------------------------------------------
# ONNX exports of the tiny models (the `onnx` package, a dev dependency, does the export), so
# the ONNX teacher backend and the int8 de-quantisation at provisioning run in the default suite.

_BERT_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


class _ExportableBert(BertModel):
    """BertModel whose forward takes the three inputs by position and returns the hidden
    states (the exporter traces positional inputs; the module tree, so node names, is
    BertModel's own, as in the int8 files that provisioning converts)."""

    def forward(self, input_ids, attention_mask, token_type_ids):  # noqa: ANN001, ANN201
        return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state


def _export_onnx(model: torch.nn.Module, path: Path, output: str) -> None:
    sample = torch.randint(5, 50, (2, 7))
    torch.onnx.export(
        model, (sample, torch.ones_like(sample), torch.zeros_like(sample)), str(path),
        input_names=_BERT_INPUTS, output_names=[output], opset_version=17, dynamo=False,
        dynamic_axes={**{name: {0: "batch", 1: "tokens"} for name in _BERT_INPUTS},
                      output: {0: "batch"}},
    )


def build_onnx_teacher(hf_teacher: Path, folder: Path) -> ModelSpec:
    """The tiny teacher's weights exported to float ONNX (logits [batch, 1]) with its
    tokenizer: the same scorer on onnxruntime, registered as format "onnx"."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (hf_teacher / name).is_file():
            (folder / name).write_bytes((hf_teacher / name).read_bytes())
    # Like the provisioned teacher's tokenizer.json: every pair padded and truncated to 512.
    tokenizer = json.loads((hf_teacher / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["padding"] = {"strategy": {"Fixed": 512}, "direction": "Right",
                            "pad_to_multiple_of": None, "pad_id": 0, "pad_type_id": 0,
                            "pad_token": "[PAD]"}
    tokenizer["truncation"] = {"direction": "Right", "max_length": 512,
                               "strategy": "LongestFirst", "stride": 0}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    model = BertForSequenceClassification.from_pretrained(hf_teacher).eval()
    _export_onnx(model, folder / "model.onnx", "logits")
    return _save_spec(folder, ModelSpec(
        name="tiny-onnx-teacher", role="teacher", format="onnx", path="model.onnx",
        max_query_length=64, max_passage_length=512, licence="test-only",
        source="tests/tiny_models.py (tiny-teacher exported to ONNX)",
    ))


def build_int8_onnx_encoder(folder: Path) -> BertModel:
    """A folder as a provisioned int8 ONNX student arrives (model.onnx quantised by
    onnxruntime's quantize_dynamic, per-channel int8 MatMul weights, config.json, tokenizer);
    returns the float model it was made from. Every weight is perturbed first, so no two
    initializers are equal (the exporter shares equal constants, e.g. fresh zero biases)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tokenizer = _save_bert_tokenizer(folder, max_length=512)
    torch.manual_seed(4)
    model = _ExportableBert(_bert_config(len(tokenizer)), add_pooling_layer=False).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    model.config.save_pretrained(folder)
    _export_onnx(model, folder / "float.onnx", "last_hidden_state")
    quantize_dynamic(str(folder / "float.onnx"), str(folder / "model.onnx"),
                     weight_type=QuantType.QInt8, per_channel=True)
    (folder / "float.onnx").unlink()
    return model


def build_int8_onnx_teacher(hf_teacher: Path, folder: Path) -> Path:
    """The tiny teacher as the default teacher arrives: int8 ONNX (onnxruntime's
    quantize_dynamic, one scale per weight matrix) with its tokenizer, plus the config.json that
    provisioning writes for it, registered as format "onnx". Every weight is perturbed first (as
    in build_int8_onnx_encoder); returns the folder of the float HF teacher it was made from."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    float_folder = folder.with_name(folder.name + "-float")
    shutil.copytree(hf_teacher, float_folder)
    model = BertForSequenceClassification.from_pretrained(float_folder).eval()
    torch.manual_seed(5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model.save_pretrained(float_folder)
    spec = build_onnx_teacher(float_folder, folder)
    (folder / "model.onnx").rename(folder / "float.onnx")
    # Per-tensor, as the default teacher's file is. Per-channel scales put every column's
    # weights at the full int8 range, where onnxruntime's u8s8 kernel on CPUs without VNNI
    # saturates (VPMADDUBSW) and the ONNX run, the reference here, scores far off its float model.
    quantize_dynamic(str(folder / "float.onnx"), str(folder / "model.onnx"),
                     weight_type=QuantType.QInt8, per_channel=False)
    (folder / "float.onnx").unlink()
    (folder / "config.json").write_bytes((float_folder / "config.json").read_bytes())
    _save_spec(folder, spec.model_copy(update={
        "name": "tiny-int8-teacher", "source": "tests/tiny_models.py (tiny-teacher, int8 ONNX)"}))
    return float_folder
